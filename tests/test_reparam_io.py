"""save_sigma_reparam / load_sigma_reparam: converted models round-trip through safetensors."""
import pytest
import torch
from torch import nn

from sigma_core.reparam import (convert_to_sigma_reparam, load_sigma_reparam, save_sigma_reparam,
                                sigma_reparam_state)
from tests import thirdparty_models as tm

pytestmark = pytest.mark.filterwarnings("ignore:convert_to_sigma_reparam.*tied weights:UserWarning")


def _encoder(seed=0, ff=32):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(16, 4, ff, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), {
        "src": torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(seed))}


FAMILIES = {"gpt_neox": tm.tiny_gpt_neox, "vit": tm.tiny_vit, "mistral": tm.tiny_mistral,
            "t5": tm.tiny_t5, "torch_encoder": _encoder}


def _out(model, inputs):
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out[0]


def _train_a_step(model, inputs):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    _out_train = model(**inputs)
    t = _out_train if isinstance(_out_train, torch.Tensor) else _out_train[0]
    t.float().pow(2).mean().backward()
    opt.step()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_into_freshly_converted_model(family, tmp_path):
    build = FAMILIES[family]
    model, inputs = build(seed=0)
    convert_to_sigma_reparam(model)
    _train_a_step(model, inputs)  # gamma, the raw weights and _u/_v move away from initialisation
    ref = _out(model, inputs)
    state = sigma_reparam_state(model)
    f = tmp_path / "m.safetensors"
    save_sigma_reparam(model, f)
    fresh, _ = build(seed=1)  # other random weights
    convert_to_sigma_reparam(fresh)
    assert not torch.equal(_out(fresh, inputs), ref)
    load_sigma_reparam(fresh, f)
    assert torch.equal(_out(fresh, inputs), ref)
    assert sigma_reparam_state(fresh) == state
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_tied_weights_stay_tied(tmp_path):
    model, inputs = tm.tiny_t5(seed=0)  # lm_head tied to shared
    convert_to_sigma_reparam(model)
    f = tmp_path / "t5.safetensors"
    save_sigma_reparam(model, f)
    fresh, _ = tm.tiny_t5(seed=2)
    convert_to_sigma_reparam(fresh)
    load_sigma_reparam(fresh, f)
    assert fresh.lm_head.weight is fresh.shared.weight
    assert torch.equal(fresh.lm_head.weight, model.shared.weight)


def test_mismatch_refused_by_name(tmp_path):
    model, _ = tm.tiny_gpt_neox(seed=0)
    convert_to_sigma_reparam(model)
    f = tmp_path / "neox.safetensors"
    save_sigma_reparam(model, f)
    other, _ = tm.tiny_gpt_neox(seed=0)
    convert_to_sigma_reparam(other, exclude=["lm_head"])
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"lm_head\.parametrizations\.weight") as e:
        load_sigma_reparam(other, f)
    assert "lm_head.weight" in str(e.value)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())  # nothing loaded
    plain, _ = tm.tiny_gpt_neox(seed=0)
    with pytest.raises(ValueError, match="keys missing from model"):
        load_sigma_reparam(plain, f)


def test_options_mismatch_and_bad_arguments(tmp_path):
    model, _ = _encoder()
    convert_to_sigma_reparam(model)
    f = tmp_path / "enc.safetensors"
    save_sigma_reparam(model, f)
    other, _ = _encoder()
    convert_to_sigma_reparam(other, n_power_iterations=2)
    with pytest.raises(ValueError, match="options differ: .*n_power_iterations"):
        load_sigma_reparam(other, f)
    wide, _ = _encoder(ff=24)
    convert_to_sigma_reparam(wide)
    with pytest.raises(ValueError, match=r"shapes differ: layers\.0\.linear1\.bias \(32,\) in the file, \(24,\) in model, layers\.0\.linear1\.parametrizations"):
        load_sigma_reparam(wide, f)
    with pytest.raises(ValueError, match="path"):
        load_sigma_reparam(model, tmp_path / "missing.safetensors")
    with pytest.raises(TypeError, match="model"):
        save_sigma_reparam("not a model", f)
    with pytest.raises(TypeError, match="path"):
        load_sigma_reparam(model, 3)


HF_FAMILIES = ["gpt_neox", "vit"]


def _hf_class(family):
    import transformers

    return {"gpt_neox": transformers.AutoModelForCausalLM, "vit": transformers.ViTModel}[family]


def _from_pretrained(family, d):
    extra = {"add_pooling_layer": False} if family == "vit" else {}  # as tests/thirdparty_models.py builds it
    return _hf_class(family).from_pretrained(d, output_loading_info=True, **extra)


def _trained(family):
    model, inputs = FAMILIES[family](seed=0)
    convert_to_sigma_reparam(model)
    _train_a_step(model, inputs)
    return model, inputs


@pytest.mark.parametrize("family,ours,legacy", [
    ("gpt_neox", "lm_head.parametrizations.weight.0._u", "embed_out.parametrizations.weight.0._u"),
    ("vit", "layers.0.attention.k_proj.parametrizations.weight.0._u",
     "encoder.layer.0.attention.attention.key.parametrizations.weight.0._u")])
def test_transformers_save_pretrained_renames_keys_and_ours_does_not(family, ours, legacy, tmp_path):
    """Why the pair exists (docs/reparam.md): transformers 5's own save_pretrained writes legacy key
    names, sigmaReparam keys included."""
    from safetensors.torch import load_file

    model, _ = FAMILIES[family](seed=0)
    convert_to_sigma_reparam(model)
    type(model).save_pretrained(model, tmp_path / "hf")  # transformers' own, not the converted model's
    hf_keys = set(load_file(tmp_path / "hf" / "model.safetensors"))
    if ours in hf_keys:
        pytest.skip("this transformers version keeps the model's own keys in save_pretrained")
    assert legacy in hf_keys
    save_sigma_reparam(model, tmp_path / "m.safetensors")
    assert ours in set(load_file(tmp_path / "m.safetensors"))


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_save_pretrained_of_a_converted_model_loads_with_from_pretrained_and_resumes_exactly(family, tmp_path):
    """A converted model's save_pretrained writes the folded model (from_pretrained of the plain
    class: every key found, the converted model's eval function) and its sigmaReparam state
    (load_sigma_reparam on the directory: the same outputs and sigma/gamma, bit for bit); the
    model saved is left as it was."""
    import json

    from safetensors.torch import load_file

    model, inputs = _trained(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = _out(model, inputs)
    model.save_pretrained(tmp_path / "hf")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["sigma_reparam"]["state_file"] == \
        "sigma_reparam.safetensors"
    assert not [k for k in load_file(tmp_path / "hf" / "model.safetensors") if "parametrizations" in k]
    plain, info = _from_pretrained(family, tmp_path / "hf")
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set(), info
    torch.testing.assert_close(_out(plain, inputs), ref, rtol=1e-5, atol=1e-5)
    fresh, _ = FAMILIES[family](seed=1)
    convert_to_sigma_reparam(fresh)
    load_sigma_reparam(fresh, tmp_path / "hf")  # the directory: its sigma_reparam.safetensors
    assert torch.equal(_out(fresh, inputs), ref)
    assert sigma_reparam_state(fresh) == sigma_reparam_state(model)


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("family", HF_FAMILIES)
def test_legacy_keyed_state_dicts_load_into_a_converted_model(family, strict, tmp_path):
    """What transformers' own save_pretrained writes (legacy names, sigmaReparam keys included)
    loads into a converted model, strict or not, bit for bit; the folded model.safetensors of a
    converted model's save_pretrained (legacy plain names) loads as pretrained weights do (the
    same function to float tolerance).  Nothing is left at random."""
    from safetensors.torch import load_file

    model, inputs = _trained(family)
    ref = _out(model, inputs)
    type(model).save_pretrained(model, tmp_path / "legacy")
    model.save_pretrained(tmp_path / "folded")
    fresh, _ = FAMILIES[family](seed=1)
    convert_to_sigma_reparam(fresh)
    res = fresh.load_state_dict(load_file(tmp_path / "legacy" / "model.safetensors"), strict=strict)
    assert res.unexpected_keys == [] and res.missing_keys == []
    assert torch.equal(_out(fresh, inputs), ref) and sigma_reparam_state(fresh) == sigma_reparam_state(model)
    fresh, _ = FAMILIES[family](seed=1)
    convert_to_sigma_reparam(fresh)
    res = fresh.load_state_dict(load_file(tmp_path / "folded" / "model.safetensors"), strict=strict)
    assert res.unexpected_keys == [] and res.missing_keys == []
    torch.testing.assert_close(_out(fresh, inputs), ref, rtol=1e-5, atol=1e-5)


def test_save_pretrained_options_trainer_state_dict_copies_and_fold(tmp_path):
    """The Trainer's call (state_dict=model.state_dict(), is_main_process) saves those values; a
    state_dict of other keys, positional options and save_original_format=False are refused by
    name; a deepcopy saves itself; a folded model saves as a plain one (no sigmaReparam state)."""
    import copy

    from sigma_core.reparam import fold_sigma_reparam

    model, inputs = _trained("gpt_neox")
    ref = _out(model, inputs)
    model.save_pretrained(tmp_path / "trainer", state_dict=model.state_dict(), is_main_process=True)
    plain, _ = _from_pretrained("gpt_neox", tmp_path / "trainer")
    torch.testing.assert_close(_out(plain, inputs), ref, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "worker", is_main_process=False)
    assert not (tmp_path / "worker" / "sigma_reparam.safetensors").exists()
    with pytest.raises(ValueError, match=r"state_dict: .*missing: gpt_neox\.layers\.0\..*"
                                         r"extra: gpt_neox\.layers\.0\.attention\.dense\.weight"):
        model.save_pretrained(tmp_path / "x", state_dict=plain.state_dict())
    with pytest.raises(TypeError, match="keyword"):
        model.save_pretrained(tmp_path / "x", True)
    with pytest.raises(ValueError, match="save_original_format"):
        model.save_pretrained(tmp_path / "x", save_original_format=False)
    twin = copy.deepcopy(model)
    assert twin.save_pretrained.__self__ is twin
    fold_sigma_reparam(model)
    assert "save_pretrained" not in model.__dict__
    model.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / "sigma_reparam.safetensors").exists()
    plain, info = _from_pretrained("gpt_neox", tmp_path / "plain")
    assert info["missing_keys"] == set()
    torch.testing.assert_close(_out(plain, inputs), ref, rtol=1e-5, atol=1e-5)
