"""Zero-shot evaluation of zeroseg checkpoints: datasets, text embeddings, segmenter, mIoU."""
