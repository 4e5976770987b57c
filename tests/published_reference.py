"""Reference pipelines transcribed from the published code, not from evaluation/: the measure of how closely
zs-eval follows each method (tests/test_fidelity.py; the agreement numbers of issue 24).

- mmcv 0.x/1.x `imrescale` (keep ratio, `int(side * scale + 0.5)`) with cv2's INTER_LINEAR (half-pixel
  centres, no antialiasing), on uint8 pixels.
- mmseg 0.x `EncoderDecoder.slide_inference` / `whole_inference`: logits of each crop summed on the resized
  image, divided by the count, resized once bilinearly to the original size, argmax.
- GroupViT `GroupViTSegInference.encode_decode` (segmentation/evaluation/group_vit_seg.py).
- SCLIP `clip_segmentor.py`, NACLIP `naclip.py` + `clip/model.py`, ClearCLIP `clearclip_segmentor.py` +
  `open_clip/transformer.py`: the tower with the positional embedding resized by scale_factor (n + 0.1) / n0,
  forward_feature / forward_slide, PAMR (NACLIP's `pamr.py`, written as its shift kernels), postprocess_result.

tests/agreement.py measures zs-eval's agreement with each reference (whole and slide).
"""

import math

import numpy as np
import torch
import torch.nn.functional as F


def mmcv_rescale(pixels: np.ndarray, short_side: int, long_side: int = 2048) -> np.ndarray:
    """[H, W, 3] uint8 -> [H', W', 3] uint8 as mmcv.imrescale(keep_ratio) with cv2 bilinear."""
    h, w = pixels.shape[:2]
    scale = min(long_side / max(h, w), short_side / min(h, w))
    new_w, new_h = int(w * scale + 0.5), int(h * scale + 0.5)
    image = torch.from_numpy(pixels).permute(2, 0, 1)[None].double()
    out = F.interpolate(image, size=(new_h, new_w), mode="bilinear", align_corners=False)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def mmseg_logits(image, crop, stride, channels, encode_decode, mode, original_hw, pad_to=None):
    """mmseg 0.x slide_inference / whole_inference (rescale=True) -> [1, channels, H, W] at the original size.
    pad_to: ClearCLIP's forward_slide, which pads a crop to a multiple of the patch (compute_padsize) and cuts."""
    if mode == "whole":
        logits = encode_decode(image)
    else:
        _, _, h_img, w_img = image.shape
        h_grids = max(h_img - crop + stride - 1, 0) // stride + 1
        w_grids = max(w_img - crop + stride - 1, 0) // stride + 1
        preds = image.new_zeros((1, channels, h_img, w_img))
        count = image.new_zeros((1, 1, h_img, w_img))
        for h_idx in range(h_grids):
            for w_idx in range(w_grids):
                y1, x1 = h_idx * stride, w_idx * stride
                y2, x2 = min(y1 + crop, h_img), min(x1 + crop, w_img)
                y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
                crop_img = image[:, :, y1:y2, x1:x2]
                H, W = crop_img.shape[2:]
                pad = _padsize(H, W, pad_to) if pad_to else (0, 0, 0, 0)
                crop_logit = encode_decode(F.pad(crop_img, pad) if any(pad) else crop_img)
                if any(pad):
                    crop_logit = crop_logit[:, :, pad[2] : pad[2] + H, pad[0] : pad[0] + W]
                preds += F.pad(crop_logit, (x1, w_img - x2, y1, h_img - y2))
                count[:, :, y1:y2, x1:x2] += 1
        logits = preds / count
    return F.interpolate(logits, size=original_hw, mode="bilinear", align_corners=False)


def _padsize(H, W, patch):
    left = right = top = bottom = 0
    if W % patch:
        lr = patch - W % patch
        left, right = lr // 2, lr - lr // 2
    if H % patch:
        tb = patch - H % patch
        top, bottom = tb // 2, tb - tb // 2
    return left, right, top, bottom


def groupvit_encode_decode(student, text, logit_scale, bg_thresh, patch):
    """GroupViT's encode_decode for one crop, with the ZeroSeg student as its image encoder (the patch
    convolution's floor: the model sees the crop cut to a multiple of the patch)."""
    text = F.normalize(text.double(), dim=-1)

    def encode_decode(img):
        h, w = img.shape[-2:]
        out = student(img[:, :, : h // patch * patch, : w // patch * patch], mask_ratio=0.0)
        attn = out.soft_assignments[0].double()
        for stage in out.soft_assignments[1:]:
            attn = attn @ stage.double()  # [1, hw, G]
        gh, gw = out.grid_size
        attn_map = attn.transpose(1, 2).reshape(1, -1, gh, gw)
        attn_map = F.interpolate(attn_map, size=(h, w), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
        onehot = F.one_hot(attn_map.argmax(dim=-1), num_classes=attn_map.shape[-1]).double()  # [H, W, G]
        groups = F.normalize(out.g[0].double(), dim=-1)
        avg = F.normalize(out.z.double(), dim=-1)
        scale = min(math.exp(logit_scale), 100)
        affinity = groups @ text.T * scale
        pre = F.softmax(affinity, dim=-1)
        avg_aff = F.softmax(avg @ text.T * scale, dim=-1)
        mask = torch.zeros_like(avg_aff)
        top = avg_aff.topk(dim=-1, k=min(5, len(text)))
        mask.scatter_add_(dim=-1, index=top.indices, src=torch.ones_like(top.values))
        affinity.masked_fill_(~mask.bool(), float("-inf"))
        affinity = F.softmax(affinity, dim=-1) * pre
        logits = torch.zeros(len(text) + 1, h, w, dtype=torch.float64)
        logits[1:] = (onehot @ affinity).permute(2, 0, 1)
        logits[0, (onehot @ affinity).max(dim=-1).values < min(bg_thresh, affinity.max().item())] = 1
        return logits[None]

    return encode_decode


def groupvit_labels(student, text, logit_scale, bg_thresh, pixels, mode, short=448, crop=448, stride=224, patch=16):
    """Labels [H, W] of GroupViT's pipeline with the student; pixels [H, W, 3] uint8; mean/std 0.5/0.25."""
    image = _normalised(mmcv_rescale(pixels, short), (0.5,) * 3, (0.25,) * 3)
    with torch.no_grad():
        encode_decode = groupvit_encode_decode(student, text, logit_scale, bg_thresh, patch)
        logits = mmseg_logits(image, crop, stride, len(text) + 1, encode_decode, mode, pixels.shape[:2])
    return logits[0].argmax(0).numpy()


def _normalised(pixels, mean, std):
    image = torch.from_numpy(pixels).permute(2, 0, 1).double() / 255.0
    return ((image - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))[None].float()


def reference_tower(visual, img, method):
    """The CLIP tower of SCLIP / ClearCLIP / NACLIP (their clip/model.py or open_clip/transformer.py forward,
    return_all): [1, 1 + h*w, D]."""
    B, nc, w, h = img.shape
    patch = visual.patch_size[0]
    x = visual.conv1(img)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
    N = visual.positional_embedding.shape[0] - 1
    if x.shape[1] != N + 1:
        pos = visual.positional_embedding[1:]
        w0, h0 = w // patch + 0.1, h // patch + 0.1
        pos = F.interpolate(
            pos.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), -1).permute(0, 3, 1, 2), mode="bicubic",
            scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)), align_corners=False, recompute_scale_factor=False,
        )  # fmt: skip
        pos = torch.cat([visual.positional_embedding[:1], pos.permute(0, 2, 3, 1).reshape(-1, pos.shape[1])])
        x = x + pos
    else:
        x = x + visual.positional_embedding
    x = visual.ln_pre(x)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    block = visual.transformer.resblocks[-1]
    attended = _custom_attn(block.attn, block.ln_1(x), method, (w // patch, h // patch))
    if method in ("sclip", "maskclip"):
        x = x + attended
        x = x + block.mlp(block.ln_2(x))
    else:
        x = attended
    return visual.ln_post(x) @ visual.proj


def _custom_attn(attn_layer, x, method, n_patches, std=5.0):
    bsz, tokens, embed_dim = x.shape
    heads = attn_layer.num_heads
    head_dim = embed_dim // heads
    scale = head_dim**-0.5
    q, k, v = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(bsz, tokens, heads, head_dim).transpose(1, 2).reshape(bsz * heads, tokens, head_dim)
               for t in (q, k, v))  # fmt: skip
    if method == "maskclip":
        weights = torch.eye(tokens)[None]
    elif method == "sclip":
        weights = F.softmax(q @ q.transpose(1, 2) * scale, -1) + F.softmax(k @ k.transpose(1, 2) * scale, -1)
    elif method == "clearclip":
        weights = F.softmax(q @ q.transpose(1, 2) * scale, -1)
    elif method == "clearclip-vanilla":
        weights = F.softmax(q @ k.transpose(1, 2) * scale, -1)
    else:  # naclip: NACLIP's gaussian_window + get_attention_addition
        dims = [side * 2 - 1 for side in n_patches]
        constant = 1 / (std * math.sqrt(2))
        ks = [torch.linspace(-(d - 1) / 2.0 * constant, (d - 1) / 2.0 * constant, d) for d in dims]
        window = torch.exp(-(torch.stack(torch.meshgrid(*ks, indexing="ij")) ** 2).sum(0))
        d1, d2 = n_patches
        m = torch.einsum("ij,kl->ijkl", torch.eye(d1), torch.eye(d2)).permute(0, 3, 1, 2).contiguous()
        out = F.conv2d(m.view(-1, d1, d2).unsqueeze(1), window[None, None], padding="same").squeeze(1)
        out = out.view(d1 * d2, d1 * d2)
        out = torch.hstack([torch.zeros(d1 * d2 + 1, 1), torch.vstack([torch.zeros(1, d1 * d2), out])])
        weights = F.softmax(k @ k.transpose(1, 2) * scale + out[None], -1)
    out = (weights @ v).reshape(bsz, heads, tokens, head_dim).transpose(1, 2).reshape(bsz, tokens, embed_dim)
    return attn_layer.out_proj(out)


def pamr(image, mask, steps=10, dilations=(8, 16)):
    """NACLIP's PAMR (visinf/1-stage-wseg), as its shift kernels write it: image [1, 3, H, W], mask [1, C, H, W]."""

    def shifts(x, kernel):
        B, K, H, W = x.shape
        x = x.reshape(B * K, 1, H, W)
        outs = [F.conv2d(F.pad(x, [d] * 4, mode="replicate"), kernel, dilation=d) for d in dilations]
        return torch.cat(outs, 1).view(B, K, -1, H, W)

    neighbours = [(i, j) for i in range(3) for j in range(3) if (i, j) != (1, 1)]
    diff, copy, every = torch.zeros(8, 1, 3, 3), torch.zeros(8, 1, 3, 3), torch.zeros(9, 1, 3, 3)
    for n, (i, j) in enumerate(neighbours):
        diff[n, 0, 1, 1], diff[n, 0, i, j], copy[n, 0, i, j] = 1, -1, 1
    for n in range(9):
        every[n, 0, n // 3, n % 3] = 1
    x_std = shifts(image, every).std(2, keepdim=True)
    x = -shifts(image, diff).abs() / (1e-8 + 0.1 * x_std)
    x = F.softmax(x.mean(1, keepdim=True), 2)
    for _ in range(steps):
        mask = (shifts(mask, copy) * x).sum(2)
    return mask


def peer_labels(visual, query_text, query_class, pixels, method, mode, short, crop, stride, logit_scale, prob_thd,
                mean, std, area_thd=None, pamr_steps=0, pad=False):  # fmt: skip
    """Labels [H, W] of SCLIP / ClearCLIP / NACLIP's predict: query_text [Q, D] normalised, query_class [Q]
    (their get_cls_idx), pixels [H, W, 3] uint8."""
    patch = visual.patch_size[0]
    image = _normalised(mmcv_rescale(pixels, short), mean, std)
    query_text = F.normalize(query_text.float(), dim=-1)

    def forward_feature(img):
        features = reference_tower(visual, img, method)[:, 1:]
        features = features / features.norm(dim=-1, keepdim=True)
        logits = features @ query_text.T
        w, h = img.shape[-2] // patch, img.shape[-1] // patch
        logits = logits.permute(0, 2, 1).reshape(-1, len(query_text), w, h)
        return F.interpolate(logits, size=img.shape[-2:], mode="bilinear")

    with torch.no_grad():
        logits = mmseg_logits(image, crop, stride, len(query_text), forward_feature, mode, pixels.shape[:2],
                              pad_to=patch if pad else None)  # fmt: skip
        if pamr_steps:
            resized = F.interpolate(image, size=pixels.shape[:2], mode="bilinear", align_corners=False)
            logits = pamr(resized, logits, pamr_steps)
    seg = (logits[0] * logit_scale).softmax(0)
    num_cls = int(max(query_class)) + 1
    if num_cls != len(query_class):
        index = F.one_hot(torch.tensor(query_class)).T.view(num_cls, len(query_class), 1, 1)
        seg = (seg[None] * index).max(1)[0]
    if area_thd is not None:
        predictions = F.one_hot(seg.argmax(0), num_cls).to(seg.dtype)
        area = predictions[:, :, 1:].sum((0, 1), keepdim=True)
        area = (area > area_thd * area.sum()).to(seg.dtype)
        seg[1:] *= area.transpose(0, -1)
    pred = seg.argmax(0)
    pred[seg.max(0)[0] < prob_thd] = 0
    return pred.numpy()
