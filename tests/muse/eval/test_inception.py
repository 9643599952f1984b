"""The FID InceptionV3: torch-fidelity's names and shapes load strictly, TF1 bilinear resizing by hand,
and (where torch-fidelity's files are installed) the same outputs as its network."""

import importlib
import importlib.util
import sys
import types

import pytest
import torch

from inception_layout import CONVS, layout_state
from muse.eval.inception import FidInceptionV3, load_fid_inception, resize_bilinear_tf1


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """(path, state) of a written-out weights file without BatchNorm counters."""
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    state = layout_state()
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def loaded(weights):
    return load_fid_inception(weights[0], dtype=torch.float32)


def test_the_published_layout_loads_strictly(weights, loaded):
    path, state = weights
    assert len(CONVS) == 94
    own = loaded.state_dict()
    assert {k for k in own if not k.endswith("num_batches_tracked")} == set(state)
    torch.testing.assert_close(own["Mixed_7c.branch_pool.conv.weight"], state["Mixed_7c.branch_pool.conv.weight"])
    assert loaded.dtype == torch.float32 and not loaded.training
    # A file that does keep the counters loads strictly too.
    counters = {f"{name}.bn.num_batches_tracked": torch.tensor(0) for name, *_ in CONVS}
    loaded.load_state_dict(state | counters, strict=True)
    assert FidInceptionV3().dtype == torch.float64  # the official evaluator's


def test_loading_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_fid_inception(tmp_path / "missing.pth")
    # torchvision's 1000-class head instead of the FID graph's 1008.
    torch.save({"fc.weight": torch.zeros(1000, 2048)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError,
                       match=r"do not fit the FID InceptionV3.*fc.weight \(1000, 2048\) \(expected \(1008, 2048\)\)"):
        load_fid_inception(tmp_path / "bad.pth")
    torch.save({"AuxLogits.fc.weight": torch.zeros(1000, 768)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError,
                       match=rf"{len(CONVS) * 5 + 2} missing: Conv2d_1a_3x3.conv.weight.*; 1 unexpected: AuxLogits"):
        load_fid_inception(tmp_path / "extra.pth")


def test_tf1_bilinear_resize_by_hand():
    image = torch.tensor([[[[0.0, 10.0], [20.0, 30.0]]]], dtype=torch.float64)
    # Scale 2/4: output i samples input i/2, between ⌊i/2⌋ and the next pixel, clamped at the border.
    expected = torch.tensor([[0, 5, 10, 10], [10, 15, 20, 20], [20, 25, 30, 30], [20, 25, 30, 30]],
                            dtype=torch.float64)
    torch.testing.assert_close(resize_bilinear_tf1(image, 4)[0, 0], expected)
    same = torch.rand(1, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(resize_bilinear_tf1(same, 5), same)


def test_forward_gives_pool_features_and_unbiased_logits(weights, loaded):
    state, model = weights[1], loaded
    images = torch.randint(0, 256, (1, 3, 40, 48), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    out = model(images)
    assert out["pool"].shape == (1, 2048) and out["logits_unbiased"].shape == (1, 1008)
    assert torch.isfinite(out["pool"]).all() and (out["pool"] >= 0).all()  # pooled ReLU outputs
    torch.testing.assert_close(out["logits_unbiased"], out["pool"] @ state["fc.weight"].t())  # no bias
    with pytest.raises(ValueError, match="reads uint8"):
        model(images.float())


def _torch_fidelity_inception():
    """torch-fidelity's network module, imported without its package __init__ (which imports torchvision)."""
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        return None
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    saved = sys.modules.get("torch_fidelity")
    sys.modules["torch_fidelity"] = package
    try:
        return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    except ImportError:
        return None
    finally:
        if saved is not None:
            sys.modules["torch_fidelity"] = saved


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None, reason="torch-fidelity is not installed")
def test_same_outputs_as_torch_fidelity(weights):
    module = _torch_fidelity_inception()
    if module is None:
        pytest.skip("torch-fidelity's Inception module does not import here")
    reference = module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                   feature_extractor_weights_path=str(weights[0]),
                                                   feature_extractor_internal_dtype="float64")
    # torch-fidelity 0.4.0 maps "float64" to float32 (helpers.text_to_dtype): the float64 the official
    # evaluator runs is set by hand.
    reference.to(torch.float64)
    reference.feature_extractor_internal_dtype = torch.float64
    ours = load_fid_inception(weights[0])
    images = torch.randint(0, 256, (2, 3, 64, 80), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    pool, logits = reference(images)
    out = ours(images)
    # torch-fidelity hands its features out rounded to float32; ours stay float64.
    torch.testing.assert_close(out["pool"].float(), pool, rtol=2e-7, atol=1e-7)
    torch.testing.assert_close(out["logits_unbiased"].float(), logits, rtol=2e-7, atol=1e-6)
