"""GroupViT's labeling rule written out in numpy from its description: the reference the evaluator's
LabelingRule is tested against (tests/test_labeling_rule.py, tests/test_eval_segmenter.py)."""

import numpy as np


def numpy_groupvit_labels(groups, image, text, logit_scale, bg_threshold, owner, top_k=5, product=True):
    """GroupViT's rule for one window, transcribed in numpy from its description: groups [G, D], image
    [D], text [C, D], owner [P] (each pixel's group) -> labels [P] (0 background, k = class k).
    product=False leaves out the product with the full softmax (P = A_top), to show what it changes."""

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    def softmax(x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    s = min(np.exp(logit_scale), 100.0)
    logits = unit(groups) @ unit(text).T * s  # [G, C]
    prior = softmax(unit(image) @ unit(text).T * s)  # [C]
    top = np.argsort(-prior, kind="stable")[: min(top_k, len(text))]
    masked = np.full_like(logits, -np.inf)
    masked[:, top] = logits[:, top]
    product = softmax(masked) * (softmax(logits) if product else 1.0)  # P [G, C]
    pixel_scores = product[owner]  # [P, C]
    background = pixel_scores.max(axis=-1) < min(bg_threshold, product.max())  # [P]
    return np.concatenate([background[:, None].astype(float), pixel_scores], axis=1).argmax(axis=1)
