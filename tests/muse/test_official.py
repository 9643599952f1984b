"""The official MUSE model, exactly: official checkpoints (written by the tests in the official layout,
not from our state dict) load strictly and give what the official forward computes; our weights go
back to the official layout bit-exactly; the encoder loads from every folder layout users have."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import official_layout as official
from muse.config import load_config
from muse.models import MuseTokenizer
from muse.models.official import to_official_state_dict
from muse.models.pretrained import saved_names

TINY = dict(enc_hidden=32, enc_layers=2, enc_heads=2, enc_inter=64, patch=4, native=32,
            dim=64, blocks=2, heads=4, latent=8, text_dim=16)


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny").model


@pytest.fixture(scope="module")
def official_state(cfg):
    """A stage-2 official checkpoint of the tiny architecture, key by key from the official layout."""
    from diffusers import AutoencoderDC  # noqa: F401  (the decoder's names are diffusers')

    from muse.models.tokenizer import build_autoencoder, build_teacher

    t = TINY
    shapes = {"encoder." + k: v for k, v in official.internvit_remote_shapes(
        t["enc_hidden"], t["enc_layers"], t["enc_inter"], t["patch"], t["native"]).items()}
    shapes |= official.muse_shapes(t["enc_hidden"], t["dim"], t["blocks"], t["heads"], t["latent"], t["text_dim"])
    state = official.random_state(shapes)
    torch.manual_seed(3)
    state |= {"decoder." + k: v for k, v in build_autoencoder(cfg).decoder.state_dict().items()}
    teacher = build_teacher(cfg)
    names = saved_names(teacher)  # the names transformers writes, as in the official checkpoint
    state |= {"dino_teacher." + names[k]: v for k, v in teacher.state_dict().items()}
    return state


@pytest.fixture
def images():
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _write(state, folder):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_official_checkpoint_loads_strictly_and_computes_the_official_forward(cfg, official_state, images,
                                                                             tmp_path):
    _write(official_state, tmp_path / "checkpoint-100" / "ema_model")
    model = MuseTokenizer(cfg).eval()
    info = model.load_official_checkpoint(tmp_path / "checkpoint-100")
    assert info["file"].endswith("ema_model/pytorch_model.bin")

    z, attn, v_itc = official.muse_encode(official_state, images, TINY["enc_heads"], TINY["patch"], TINY["heads"])
    torch.testing.assert_close(model.encode(images), z, rtol=1e-4, atol=1e-5)
    features = model.features(images)
    torch.testing.assert_close(features.image_embeds, official.image_embeds(official_state, v_itc),
                               rtol=1e-4, atol=1e-5)
    # The decoder's raw output (no tanh), bilinearly resized to the input size.
    expected = F.interpolate(model.decoder(z), size=(32, 32), mode="bilinear", align_corners=False)
    out = model(images, return_maps=True)
    torch.testing.assert_close(out.reconstruction, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.maps[-1], attn.mean(1), rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model.decode(z), expected, rtol=1e-4, atol=1e-5)


def test_official_block_equals_ours_on_official_weights(official_state):
    from muse.models import SynergisticBlock

    block = SynergisticBlock(64, num_heads=4, backend="torch")
    prefix = "muse_blocks.1."
    block.load_state_dict({k[len(prefix):]: v for k, v in official_state.items() if k.startswith(prefix)}, strict=True)
    x = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(4))
    y, attn, v_itc = official.block_forward(official_state, prefix, x, heads=4)
    out = block(x, return_attn="per_head")
    torch.testing.assert_close(out.x, y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.attn, attn, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.v_itc, v_itc)


def test_round_trip_ours_official_ours_is_bit_exact(cfg, tmp_path):
    torch.manual_seed(5)
    model = MuseTokenizer(cfg)
    state = to_official_state_dict(model)
    assert "encoder.encoder.layers.0.attn.qkv.weight" in state and "adapter_mlp.1.weight" in state
    assert not any(k.startswith("decoder_adapter") for k in state)  # an Identity at the decoder's channels
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    torch.manual_seed(6)
    loaded = MuseTokenizer(cfg)
    loaded.load_official_checkpoint(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_missing_or_extra_key_fails_with_its_name(cfg, official_state, tmp_path):
    model = MuseTokenizer(cfg)
    missing = {k: v for k, v in official_state.items() if k != "muse_blocks.1.mlp.w3.weight"}
    with pytest.raises(ValueError, match=r"1 missing: muse_blocks\.1\.mlp\.w3\.weight"):
        model.load_official_checkpoint(_write(missing, tmp_path / "a"))
    extra = official_state | {"decoder_adapter.weight": torch.zeros(8, 8, 1, 1)}
    with pytest.raises(ValueError, match=r"1 unexpected: decoder_adapter\.weight"):
        model.load_official_checkpoint(_write(extra, tmp_path / "b"))
    # Our own (LLaMA-convention) SwiGLU would not fit the official shapes.
    swapped = dict(official_state)
    swapped["muse_blocks.0.mlp.w2.weight"] = official_state["muse_blocks.0.mlp.w3.weight"]
    with pytest.raises(ValueError, match=r"wrong shape: muse_blocks\.0\.mlp\.w2\.weight"):
        model.load_official_checkpoint(_write(swapped, tmp_path / "c"))


def test_stage1_checkpoint_without_the_itc_head_loads(cfg, official_state, tmp_path):
    stage1 = {k: v for k, v in official_state.items() if not k.startswith(("semantic_projector", "logit_scale"))}
    model = MuseTokenizer(cfg)
    head = model.semantic_projector[0].weight.clone()
    model.load_official_checkpoint(_write(stage1, tmp_path))
    assert torch.equal(model.semantic_projector[0].weight, head)
    assert torch.equal(model.muse_blocks[0].q_topo.weight, official_state["muse_blocks.0.q_topo.weight"])
    partial = {k: v for k, v in official_state.items() if k != "logit_scale"}
    with pytest.raises(ValueError, match="missing: logit_scale"):
        model.load_official_checkpoint(_write(partial, tmp_path / "partial"))


def test_muse_1b_shapes_match_the_official_layout_on_the_meta_device(monkeypatch, tmp_path):
    import re

    from muse.config import CONFIG_DIR

    for name in {m for f in CONFIG_DIR.rglob("*.yaml") for m in re.findall(r"\$\{(\w+)\}", f.read_text())}:
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    cfg = load_config("muse_1b/stage2", [f"model.{p}.pretrained=none" for p in ("encoder", "teacher", "decoder", "text")]
                      + [f"model.{p}.random_init=true" for p in ("encoder", "teacher", "decoder", "text")]).model
    with torch.device("meta"):
        model = MuseTokenizer(cfg)
    state = to_official_state_dict(model)
    expected = {"encoder." + k: v for k, v in official.internvit_remote_shapes(1024, 24, 4096, 14, 448).items()}
    expected |= official.muse_shapes(1024, 512, 6, 8, 32, 768)
    ours = {k: tuple(v.shape) for k, v in state.items() if not k.startswith(("decoder.", "dino_teacher."))}
    assert ours == expected
    assert expected["encoder.embeddings.position_embedding"] == (1, 1025, 1024)
    assert state["muse_blocks.0.mlp.w3.weight"].shape == (512, 1365)
    # The teacher in the names transformers writes (layer.N, not its in-memory model.layer.N).
    assert "dino_teacher.layer.31.attention.q_proj.weight" in state
    assert sum(v.numel() for k, v in state.items() if k.startswith("encoder.")) > 300e6


def test_teacher_layout_official_is_the_official_transposed_target(cfg, images):
    torch.manual_seed(0)
    ours = MuseTokenizer(cfg)
    official_cfg = load_config("tiny", ["model.teacher_layout=official"]).model
    theirs = MuseTokenizer(official_cfg)
    theirs.load_state_dict(ours.state_dict())
    patches = ours.teacher_maps(images, (8, 8))  # the teacher's own grid: no resize in either layout
    torch.testing.assert_close(theirs.teacher_maps(images, (8, 8)), patches)
    expected = official.official_resize(patches, 4)
    got = theirs.teacher_maps(images, (4, 4))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    # Ours: rows are queries and sum to 1; the official target's rows are keys.
    correct = ours.teacher_maps(images, (4, 4))
    torch.testing.assert_close(correct.sum(-1), torch.ones(2, 16), rtol=0, atol=1e-5)
    assert not torch.allclose(correct, got, atol=1e-4)


@pytest.mark.parametrize("size,grid", [((48, 40), (6, 5)), ((36, 36), (4, 4)), ((72, 72), (9, 9))])
def test_any_input_resolution(cfg, official_state, tmp_path, size, grid):
    model = MuseTokenizer(cfg).eval()
    model.load_official_checkpoint(_write(official_state, tmp_path))
    images = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    latents = model.encode(images)
    assert latents.shape == (1, 8, *grid)
    features = model.features(images)
    assert features.grid == grid and features.hidden.shape == (1, grid[0] * grid[1], 64)
    out = model(images)
    assert out.reconstruction.shape == images.shape and torch.isfinite(out.loss_topo)
    if size[0] == size[1]:  # the official code takes square grids only (its sqrt of the token count)
        z, _, _ = official.muse_encode(official_state, images, TINY["enc_heads"], TINY["patch"], TINY["heads"])
        torch.testing.assert_close(latents, z, rtol=1e-4, atol=1e-5)


# --- Encoder folders in every layout ----------------------------------------------------------------

REMOTE_VISION = {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": 32,
                 "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "patch_size": 4,
                 "image_size": 32, "norm_type": "layer_norm", "layer_norm_eps": 1e-6, "qkv_bias": True,
                 "qk_normalization": False, "hidden_act": "gelu", "initializer_factor": 0.1,
                 "drop_path_rate": 0.1, "use_flash_attn": False}


@pytest.fixture(scope="module")
def remote_vision(official_state):
    return {k[len("encoder."):]: v for k, v in official_state.items() if k.startswith("encoder.")}


def _remote_full_folder(folder, vision, sharded=False):
    """InternVL3 as downloaded: remote-code full model, vision weights under ``vision_model.``."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "internvl_chat", "architectures": ["InternVLChatModel"],
                                                    "vision_config": REMOTE_VISION,
                                                    "llm_config": {"model_type": "qwen2", "hidden_size": 16}}))
    state = {"vision_model." + k: v.clone() for k, v in vision.items()}
    state |= {"language_model.model.embed_tokens.weight": torch.zeros(4, 16), "mlp1.1.weight": torch.zeros(16, 128)}
    if not sharded:
        save_file(state, folder / "model.safetensors")
        return folder
    keys = sorted(state)
    parts = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in parts.items():
        save_file({k: state[k] for k in part}, folder / name)
    weight_map = {k: name for name, part in parts.items() for k in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def _encoder_cfg(folder):
    return load_config("tiny", [f"model.encoder.pretrained={folder}", "model.encoder.random_init=false"]).model


@pytest.mark.parametrize("layout", ["remote", "remote-sharded", "hf", "bare-hf", "bare-remote"])
def test_encoder_folders_load_the_same_weights_and_outputs(cfg, remote_vision, official_state, tmp_path, layout,
                                                           images):
    from transformers import InternVLVisionModel

    from muse.models.pretrained import load_internvit

    folder = tmp_path / layout
    if layout.startswith("remote"):
        _remote_full_folder(folder, remote_vision, sharded=layout.endswith("sharded"))
    elif layout == "bare-remote":
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(REMOTE_VISION))
        save_file({k: v.clone() for k, v in remote_vision.items()}, folder / "model.safetensors")
    else:
        reference = load_internvit(_remote_full_folder(tmp_path / "source", remote_vision))
        if layout == "bare-hf":
            reference.save_pretrained(folder)
        else:  # what transformers' conversion writes: InternVLForConditionalGeneration.save_pretrained
            from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config

            text = Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=1, vocab_size=64)
            full = InternVLForConditionalGeneration(InternVLConfig(vision_config=reference.config.to_dict(),
                                                                   text_config=text.to_dict()))
            full.model.vision_tower.load_state_dict(reference.state_dict())
            full.save_pretrained(folder)
    encoder = load_internvit(folder)
    assert isinstance(encoder, InternVLVisionModel) and next(encoder.parameters()).dtype == torch.float32
    pixels = ((images + 1) / 2 - official.MEAN) / official.STD
    expected = official.internvit_forward(remote_vision, pixels, heads=2, patch=4)
    torch.testing.assert_close(encoder(pixel_values=pixels).last_hidden_state, expected, rtol=1e-4, atol=1e-5)
    model = MuseTokenizer(_encoder_cfg(folder))
    torch.testing.assert_close(model.encoder.embeddings.cls_token, remote_vision["embeddings.class_embedding"])


def test_encoder_folder_with_a_tensor_removed_fails_loudly(remote_vision, tmp_path):
    from muse.models.pretrained import load_internvit

    incomplete = {k: v for k, v in remote_vision.items() if k != "encoder.layers.1.ls2"}
    folder = _remote_full_folder(tmp_path / "remote", incomplete)
    with pytest.raises(ValueError, match=r"missing: encoder\.layer\.1\.lambda_2"):
        load_internvit(folder)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "siglip_vision_model"}))
    with pytest.raises(ValueError, match="model_type 'siglip_vision_model'"):
        load_internvit(tmp_path / "other")


def test_bf16_encoder_folder_is_kept_in_fp32(remote_vision, tmp_path):
    from muse.models.pretrained import load_internvit

    bf16 = {k: v.to(torch.bfloat16) for k, v in remote_vision.items()}
    encoder = load_internvit(_remote_full_folder(tmp_path / "remote", bf16))
    assert {p.dtype for p in encoder.parameters()} == {torch.float32}
    torch.testing.assert_close(encoder.embeddings.cls_token, bf16["embeddings.class_embedding"].float(), rtol=0, atol=0)


def test_teacher_decoder_and_text_folders_load_strictly(cfg, tmp_path):
    from muse.models import ClipTextEncoder
    from muse.models.pretrained import load_clip_text, load_dcae_decoder, load_dinov3
    from muse.models.tokenizer import build_autoencoder, build_teacher

    torch.manual_seed(8)
    teacher = build_teacher(cfg)
    teacher.save_pretrained(tmp_path / "dino")
    loaded = load_dinov3(tmp_path / "dino")
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    autoencoder = build_autoencoder(cfg)
    autoencoder.save_pretrained(tmp_path / "dcae")
    decoder, channels = load_dcae_decoder(tmp_path / "dcae")
    assert channels == 8 and torch.equal(decoder.conv_in.weight, autoencoder.decoder.conv_in.weight)
    ClipTextEncoder(cfg.text).model.save_pretrained(tmp_path / "clip")
    load_clip_text(tmp_path / "clip")
    # One weight removed from the teacher's file: an error naming it, never a random tensor.
    from safetensors.torch import load_file

    state = load_file(tmp_path / "dino" / "model.safetensors")
    del state["norm.weight"]
    save_file(state, tmp_path / "dino" / "model.safetensors")
    with pytest.raises(ValueError, match="missing: norm.weight"):
        load_dinov3(tmp_path / "dino")


def test_pretrained_clip_never_gets_the_hashing_tokenizer(cfg, tmp_path):
    from muse.models import ClipTextEncoder, HashTokenizer, build_tokenizer

    ClipTextEncoder(cfg.text).model.save_pretrained(tmp_path / "clip")
    text_cfg = load_config("tiny", [f"model.text.pretrained={tmp_path / 'clip'}",
                                    "model.text.random_init=false"]).model.text
    with pytest.raises(ValueError, match="no CLIP tokenizer in"):
        build_tokenizer(text_cfg)
    # A folder with CLIP's tokenizer files gives CLIP's tokenizer, 77 tokens.
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "c": 3, "a": 4, "t</w>": 5, "ca": 6, "cat</w>": 7}
    (tmp_path / "clip" / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "clip" / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    tokens = build_tokenizer(text_cfg)(["a cat"])
    assert tokens["input_ids"].shape == (1, 77) and tokens["input_ids"][0, :4].tolist() == [0, 2, 7, 1]
    assert isinstance(build_tokenizer(cfg.text), HashTokenizer)


def test_random_text_encoder_is_the_same_in_every_run(cfg):
    from muse.models import ClipTextEncoder

    torch.manual_seed(1)
    first = ClipTextEncoder(cfg.text)
    torch.manual_seed(2)
    second = ClipTextEncoder(cfg.text)
    ids = torch.randint(2, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(first(ids), second(ids))
    other = ClipTextEncoder(load_config("tiny", ["model.text.seed=1"]).model.text)
    assert not torch.equal(first(ids), other(ids))


def test_muse_convert_both_ways(official_state, tmp_path):
    from safetensors.torch import load_file

    from muse.convert import main
    from muse.eval.common import load_tokenizer

    source = _write(official_state, tmp_path / "official")
    assert main(["official-to-ours", str(source), str(tmp_path / "ours"), "--config", "tiny"]) == 0
    model, _ = load_tokenizer("tiny", str(tmp_path / "ours"))
    for key, value in official_state.items():
        if key.startswith(("muse_blocks.", "adapter_mlp.", "decoder.", "semantic_projector.")):
            assert torch.equal(model.state_dict()[key], value), key
    assert main(["ours-to-official", str(tmp_path / "ours"), str(tmp_path / "back"), "--config", "tiny"]) == 0
    back = load_file(tmp_path / "back" / "model.safetensors")
    # Our checkpoints leave the frozen teacher out: it comes from the config, the rest is bit-exact.
    assert set(back) == set(official_state)
    for key, value in official_state.items():
        if not key.startswith("dino_teacher."):
            assert torch.equal(back[key], value), key
    broken = {k: v for k, v in official_state.items() if k != "to_latent.bias"}
    assert main(["official-to-ours", str(_write(broken, tmp_path / "broken")), str(tmp_path / "x"),
                 "--config", "tiny"]) == 2


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_muse_3b_configs_are_muse_1b_but_where_the_official_ones_differ(monkeypatch, tmp_path, stage):
    import dataclasses
    import re

    from muse.config import CONFIG_DIR

    for name in {m for f in CONFIG_DIR.rglob("*.yaml") for m in re.findall(r"\$\{(\w+)\}", f.read_text())}:
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    one, three = load_config(f"muse_1b/stage{stage}"), load_config(f"muse_3b/stage{stage}")
    assert three.model.encoder.pretrained == str(tmp_path / "muse_internvl3_2b_path")
    # Official configs/muse_3b: 75k steps in stages 1-2 (stage 3 keeps 50k), stage-1 warm-up 5000,
    # checkpoints every 7.5k, pictures every 2.5k.
    steps = 50000 if stage == 3 else 75000
    assert (three.train.steps, three.train.ckpt_every) == (steps, 7500)
    assert three.optim.warmup_steps == (5000 if stage == 1 else one.optim.warmup_steps)
    assert three.train.init_weight == (None if stage == 1 else f"runs/muse_3b/stage{stage - 1}")
    expected = dataclasses.replace(
        one, model=dataclasses.replace(one.model, encoder=dataclasses.replace(
            one.model.encoder, pretrained=three.model.encoder.pretrained)),
        optim=dataclasses.replace(one.optim, warmup_steps=three.optim.warmup_steps),
        train=dataclasses.replace(one.train, steps=steps, ckpt_every=7500, image_every=2500, ortho_every=7500,
                                  out_dir=f"runs/muse_3b/stage{stage}", init_weight=three.train.init_weight))
    assert three == expected


def test_stage_init_weight_accepts_an_official_checkpoint(cfg, official_state, tmp_path):
    from muse.models.official import is_official_checkpoint
    from muse.train import init_from_previous_stage

    folder = _write(official_state, tmp_path / "checkpoint-50000" / "ema_model").parent
    assert is_official_checkpoint(folder) and is_official_checkpoint(folder / "ema_model" / "pytorch_model.bin")
    model = MuseTokenizer(cfg)
    init_from_previous_stage(model, str(folder), load_config("tiny/stage2"))
    assert torch.equal(model.to_latent.weight, official_state["to_latent.weight"])
    ours = tmp_path / "ours"
    ours.mkdir()
    torch.save({"ema": {}, "model": {}}, ours / "step_00000010.pt")
    assert not is_official_checkpoint(ours) and not is_official_checkpoint(ours / "step_00000010.pt")
