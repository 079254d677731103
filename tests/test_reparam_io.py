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


# -- transformers.Trainer: resume_from_checkpoint and load_best_model_at_end are exact ----------------
def _lm_data(n, seed, vocab=97, seq=12):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, vocab, (n, seq), generator=g)]


def _hf_trainer(out, model, *, max_steps, save_steps=None, eval_steps=None, **args):
    import transformers

    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=2, per_device_eval_batch_size=4,
        learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, report_to=[], disable_tqdm=True,
        use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        eval_strategy="steps" if eval_steps else "no", eval_steps=eval_steps, **args)
    return transformers.Trainer(model=model, args=args, train_dataset=_lm_data(16, 1),
                                eval_dataset=_lm_data(4, 2) if eval_steps else None)


def _converted(family, seed=0, **opts):
    model, _ = {"gpt_neox": tm.tiny_gpt_neox, "gpt2": tm.tiny_gpt2}[family](seed=seed)
    return convert_to_sigma_reparam(model, **opts)


def _losses(trainer):
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return [k for k in sa if not torch.equal(sa[k], sb[k])]


@pytest.fixture(scope="module")
def neox_run(tmp_path_factory):
    """A converted GPT-NeoX (legacy key embed_out on save) trained 4 steps by transformers.Trainer,
    with a checkpoint every 2 steps."""
    out = tmp_path_factory.mktemp("neox_run")
    whole = _hf_trainer(out, _converted("gpt_neox"), max_steps=4, save_steps=2)
    whole.train()
    return whole, out


def test_trainer_resume_from_checkpoint_is_exact(neox_run, tmp_path):
    """Trainer.train(resume_from_checkpoint=checkpoint-2) of a converted model ends bit for bit
    where the uninterrupted run ends: every raw weight, gamma, _u, _v and the losses of steps 3
    and 4 (the Trainer's load_state_dict(model.safetensors, strict=False) gets the sigmaReparam
    state of the directory's sigma_reparam.safetensors instead of the folded weights)."""
    whole, out = neox_run
    resumed = _hf_trainer(tmp_path, _converted("gpt_neox", seed=1), max_steps=4, save_steps=2)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert _same_state(resumed.model, whole.model) == []
    assert sigma_reparam_state(resumed.model) == sigma_reparam_state(whole.model)
    assert _losses(resumed) == _losses(whole) and len(_losses(whole)) == 4


def test_trainer_checkpoint_loads_refuse_what_would_not_resume_exactly(neox_run, tmp_path):
    """The Trainer's own checkpoint loader (_load_from_checkpoint, what train(resume_from_checkpoint=)
    calls first) refuses by name: a sigma_reparam.safetensors from another save (digest of the
    folded weights), a lost one, a model converted with other options, and a Trainer method it
    does not know; a folded weight the model cannot find by name is restored all the same, and a
    sharded save resumes exactly through load_sharded_checkpoint."""
    import shutil

    import transformers
    from safetensors.torch import load_file, save_file

    whole, out = neox_run
    trainer = _hf_trainer(tmp_path / "t", _converted("gpt_neox", seed=1), max_steps=4)
    mixed = tmp_path / "mixed"
    shutil.copytree(out / "checkpoint-2", mixed)
    for name in ("sigma_reparam.safetensors", "sigma_reparam.safetensors.json"):
        shutil.copy(out / "checkpoint-4" / name, mixed / name)
    with pytest.raises(RuntimeError, match=r"not those of its sigma_reparam\.safetensors \(gpt_neox\.layers"):
        trainer._load_from_checkpoint(str(mixed))
    (mixed / "sigma_reparam.safetensors").unlink()
    with pytest.raises(RuntimeError, match="holds no sigma_reparam.safetensors"):
        trainer._load_from_checkpoint(str(mixed))
    other = _hf_trainer(tmp_path / "o", _converted("gpt_neox", n_power_iterations=2), max_steps=4)
    with pytest.raises(RuntimeError, match="does not match the model .*n_power_iterations"):
        other._load_from_checkpoint(str(out / "checkpoint-2"))

    class MyTrainer(transformers.Trainer):
        def _load_my_way(self, d):
            self.model.load_state_dict(load_file(f"{d}/model.safetensors"), strict=False)

    mine = MyTrainer(model=_converted("gpt_neox", seed=1), args=trainer.args)
    with pytest.raises(RuntimeError, match=r"MyTrainer\._load_my_way .*load_sigma_reparam\(model"):
        mine._load_my_way(out / "checkpoint-2")

    merged = tmp_path / "merged"  # a folded weight under a name the model cannot map back (as a merge on save)
    shutil.copytree(out / "checkpoint-2", merged)
    weights = load_file(merged / "model.safetensors")
    layer = "gpt_neox.layers.0.attention."
    weights[layer + "qkv_merged"] = weights.pop(layer + "query_key_value.weight")
    save_file(weights, merged / "model.safetensors", metadata={"format": "pt"})
    trainer._load_from_checkpoint(str(merged))
    saved = load_sigma_reparam(_converted("gpt_neox", seed=2), out / "checkpoint-2")
    assert _same_state(trainer.model, saved) == []

    whole.model.save_pretrained(tmp_path / "sharded", max_shard_size="30KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    fresh = _converted("gpt_neox", seed=1)
    transformers.trainer_utils.load_sharded_checkpoint(fresh, tmp_path / "sharded", strict=False)
    assert _same_state(fresh, whole.model) == []


def test_trainer_load_best_model_at_end_is_exact(tmp_path):
    """load_best_model_at_end=True on a converted GPT-2 (Conv1D, tied lm_head): the model the
    Trainer ends with is exactly the best checkpoint's sigmaReparam model (checkpoint-2 here: its
    eval loss is the lower of the two), not its folded weights."""
    trainer = _hf_trainer(tmp_path, _converted("gpt2"), max_steps=4, save_steps=2, eval_steps=2,
                          load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=False)
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    best = load_sigma_reparam(_converted("gpt2", seed=1), trainer.state.best_model_checkpoint)
    assert _same_state(trainer.model, best) == []
    last = load_sigma_reparam(_converted("gpt2", seed=1), tmp_path / "checkpoint-4")
    assert _same_state(trainer.model, last)  # the best is not simply the last


# -- sigma_reparam(module) by hand on a Hugging Face model: transformers' save_pretrained refused ----
def test_save_pretrained_of_sigma_reparam_by_hand_is_refused_with_what_to_do(tmp_path):
    """sigma_reparam on a projection of a Hugging Face model (or convert_to_sigma_reparam of a
    submodule), then the model's save_pretrained: a ValueError naming the module and the fixes,
    before any weight is written (from_pretrained would re-initialise that weight at random); the
    Trainer's checkpoint save too.  The first fix it names, convert_to_sigma_reparam(model,
    exclude=['*']), converts nothing more (no warning) and saves what from_pretrained reads (same
    function) and what load_sigma_reparam restores exactly; fold_sigma_reparam gives a plain save."""
    import warnings

    import transformers

    from sigma_core.reparam import fold_sigma_reparam, sigma_reparam

    model, inputs = tm.tiny_gpt_neox(seed=0)
    for layer in model.gpt_neox.layers:
        sigma_reparam(layer.attention.query_key_value)
    _train_a_step(model, inputs)
    with pytest.raises(ValueError, match=r"GPTNeoXForCausalLM: gpt_neox\.layers\.0\.attention\.query_key_value "
                                         r"carries sigmaReparam registered by hand.*convert_to_sigma_reparam\("
                                         r"model, exclude=\['\*'\]\).*fold_sigma_reparam.*save_sigma_reparam"):
        model.save_pretrained(tmp_path / "hand")
    assert not (tmp_path / "hand" / "model.safetensors").exists() and (tmp_path / "hand" / "config.json").exists()
    with pytest.raises(ValueError, match="registered by hand"):
        _hf_trainer(tmp_path / "t", model, max_steps=1).save_model(str(tmp_path / "trainer"))
    assert "gpt_neox.layers.0.attention.query_key_value.parametrizations.weight.original" in model.state_dict()

    ref = _out(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_to_sigma_reparam(model, exclude=["*"])
    assert sorted(sigma_reparam_state(model)) == [f"gpt_neox.layers.{i}.attention.query_key_value.weight"
                                                  for i in (0, 1)]
    model.save_pretrained(tmp_path / "adopted")
    plain, info = _from_pretrained("gpt_neox", tmp_path / "adopted")
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set(), info
    torch.testing.assert_close(_out(plain, inputs), ref, rtol=1e-5, atol=1e-5)
    again, _ = tm.tiny_gpt_neox(seed=1)
    for layer in again.gpt_neox.layers:
        sigma_reparam(layer.attention.query_key_value)
    load_sigma_reparam(again, tmp_path / "adopted")
    assert _same_state(again, model) == []
    resumed, _ = tm.tiny_gpt_neox(seed=2)  # the Trainer's checkpoint loader restores it exactly too
    for layer in resumed.gpt_neox.layers:
        sigma_reparam(layer.attention.query_key_value)
    convert_to_sigma_reparam(resumed, exclude=["*"])
    _hf_trainer(tmp_path / "t2", resumed, max_steps=1)._load_from_checkpoint(str(tmp_path / "adopted"))
    assert _same_state(resumed, model) == []
    hand = {k: v.clone() for k, v in again.state_dict().items()}  # an explicit state_dict= is not checked
    type(again).save_pretrained(again, tmp_path / "explicit", state_dict=hand)
    assert (tmp_path / "explicit" / "model.safetensors").is_file()

    gpt2, inputs = tm.tiny_gpt2(seed=0)
    convert_to_sigma_reparam(gpt2.transformer)
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel: transformer\.h\.0\.attn\.c_attn carries"):
        gpt2.save_pretrained(tmp_path / "sub")
    ref = _out(gpt2, inputs)
    fold_sigma_reparam(gpt2)
    gpt2.save_pretrained(tmp_path / "folded")
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "folded")
    torch.testing.assert_close(_out(loaded, inputs), ref, rtol=1e-5, atol=1e-5)
