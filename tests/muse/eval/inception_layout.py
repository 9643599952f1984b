"""torch-fidelity's FID InceptionV3 weights layout (``feature_extractor_inceptionv3.py``), written out as
data, and a state dict in that layout with values that keep activations finite, for the tests."""

import torch


def _inception_a(prefix, cin, pool):
    return [(f"{prefix}.branch1x1", cin, 64, (1, 1)), (f"{prefix}.branch5x5_1", cin, 48, (1, 1)),
            (f"{prefix}.branch5x5_2", 48, 64, (5, 5)), (f"{prefix}.branch3x3dbl_1", cin, 64, (1, 1)),
            (f"{prefix}.branch3x3dbl_2", 64, 96, (3, 3)), (f"{prefix}.branch3x3dbl_3", 96, 96, (3, 3)),
            (f"{prefix}.branch_pool", cin, pool, (1, 1))]


def _inception_c(prefix, c):
    return [(f"{prefix}.branch1x1", 768, 192, (1, 1)), (f"{prefix}.branch7x7_1", 768, c, (1, 1)),
            (f"{prefix}.branch7x7_2", c, c, (1, 7)), (f"{prefix}.branch7x7_3", c, 192, (7, 1)),
            (f"{prefix}.branch7x7dbl_1", 768, c, (1, 1)), (f"{prefix}.branch7x7dbl_2", c, c, (7, 1)),
            (f"{prefix}.branch7x7dbl_3", c, c, (1, 7)), (f"{prefix}.branch7x7dbl_4", c, c, (7, 1)),
            (f"{prefix}.branch7x7dbl_5", c, 192, (1, 7)), (f"{prefix}.branch_pool", 768, 192, (1, 1))]


def _inception_e(prefix, cin):
    return [(f"{prefix}.branch1x1", cin, 320, (1, 1)), (f"{prefix}.branch3x3_1", cin, 384, (1, 1)),
            (f"{prefix}.branch3x3_2a", 384, 384, (1, 3)), (f"{prefix}.branch3x3_2b", 384, 384, (3, 1)),
            (f"{prefix}.branch3x3dbl_1", cin, 448, (1, 1)), (f"{prefix}.branch3x3dbl_2", 448, 384, (3, 3)),
            (f"{prefix}.branch3x3dbl_3a", 384, 384, (1, 3)), (f"{prefix}.branch3x3dbl_3b", 384, 384, (3, 1)),
            (f"{prefix}.branch_pool", cin, 192, (1, 1))]


# torch-fidelity's FeatureExtractorInceptionV3 (feature_extractor_inceptionv3.py), written out as data:
# every BasicConv2d (name, in, out, kernel) and the 1008-way fc.
CONVS = ([("Conv2d_1a_3x3", 3, 32, (3, 3)), ("Conv2d_2a_3x3", 32, 32, (3, 3)), ("Conv2d_2b_3x3", 32, 64, (3, 3)),
          ("Conv2d_3b_1x1", 64, 80, (1, 1)), ("Conv2d_4a_3x3", 80, 192, (3, 3))]
         + _inception_a("Mixed_5b", 192, 32) + _inception_a("Mixed_5c", 256, 64) + _inception_a("Mixed_5d", 288, 64)
         + [("Mixed_6a.branch3x3", 288, 384, (3, 3)), ("Mixed_6a.branch3x3dbl_1", 288, 64, (1, 1)),
            ("Mixed_6a.branch3x3dbl_2", 64, 96, (3, 3)), ("Mixed_6a.branch3x3dbl_3", 96, 96, (3, 3))]
         + _inception_c("Mixed_6b", 128) + _inception_c("Mixed_6c", 160) + _inception_c("Mixed_6d", 160)
         + _inception_c("Mixed_6e", 192)
         + [("Mixed_7a.branch3x3_1", 768, 192, (1, 1)), ("Mixed_7a.branch3x3_2", 192, 320, (3, 3)),
            ("Mixed_7a.branch7x7x3_1", 768, 192, (1, 1)), ("Mixed_7a.branch7x7x3_2", 192, 192, (1, 7)),
            ("Mixed_7a.branch7x7x3_3", 192, 192, (7, 1)), ("Mixed_7a.branch7x7x3_4", 192, 192, (3, 3))]
         + _inception_e("Mixed_7b", 1280) + _inception_e("Mixed_7c", 2048))


def layout_state(seed=0):
    """A state dict laid out as the published weights file, with sane random values (BN variances
    around 1, He-scaled convolutions) so that activations stay finite through 94 layers."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, cin, cout, (kh, kw) in CONVS:
        state[f"{name}.conv.weight"] = torch.randn(cout, cin, kh, kw, generator=gen) * (2 / (cin * kh * kw)) ** 0.5
        state[f"{name}.bn.weight"] = 1 + 0.1 * torch.randn(cout, generator=gen)
        state[f"{name}.bn.bias"] = 0.1 * torch.randn(cout, generator=gen)
        state[f"{name}.bn.running_mean"] = 0.1 * torch.randn(cout, generator=gen)
        state[f"{name}.bn.running_var"] = 0.5 + torch.rand(cout, generator=gen)
    state["fc.weight"] = torch.randn(1008, 2048, generator=gen) / 2048**0.5
    state["fc.bias"] = torch.randn(1008, generator=gen)
    return state
