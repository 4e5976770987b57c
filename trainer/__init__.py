"""Stage two of zeroseg: the ZeroSeg student, its losses, data loading and the training loop."""
