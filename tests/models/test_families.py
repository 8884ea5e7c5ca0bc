"""The family adapter: which family a model is, what it says about it, and that a third variant
is one new class (registered here for the test) with accelerate working unchanged."""
import pytest
import torch

import emu_fast
from emu_fast.dropin import families
from emu_fast.testing import rel_err, tiny_emu, tiny_emu2_hub


@pytest.mark.parametrize("kind,n,padding,out_dim", [("emu1", 8, "right", 64), ("emu2", 16, "left", 40)])
def test_family_facts(kind, n, padding, out_dim):
    model = tiny_emu(kind)
    family = families.family_of(model)
    assert family is families.family_named(kind) and family.name == kind
    assert family.n(model) == n and family.padding_side == padding == model.decoder.tokenizer.padding_side
    assert family.head(model).out_features == out_dim
    assert (family.project_up(model) is None) == (kind == "emu1")
    texts = family.prompt_texts(model, ["a [<IMG_PLH>] b"])
    assert texts == ["a " + model.image_placeholder + " b[IMG]"]
    vectors = family.prompt_image_embeds(model, torch.randn(2, 3, 8, 8))
    assert vectors.shape == (2 * n, 64)


def test_unknown_family_name():
    with pytest.raises(ValueError, match="unknown Emu family 'emu9'; known: emu1, emu2"):
        families.family_named("emu9")


def test_emu2_heads_may_sit_on_the_model():
    model = tiny_emu("emu2")
    lm = model.decoder.lm
    model.project_up, model.project_down = lm.project_up, lm.project_down
    del lm.project_up, lm.project_down
    family = families.family_of(model)
    assert family.head(model) is model.project_down and family.head_name(model) == "project_down"


class _Emu3(families.Emu1):
    """A made-up third variant: Emu1's loop, its head and n under other names (the head
    module is found from head_name)."""

    name = "emu3"
    n_attribute = "n_tokens"
    required = ["decoder.lm.regress", "n_tokens"]

    def head_name(self, model):
        return "decoder.lm.regress"


def test_a_third_variant_is_one_class(monkeypatch):
    monkeypatch.setattr(families, "FAMILIES", families.FAMILIES + [_Emu3()])
    model = tiny_emu("emu1")
    lm = model.decoder.lm
    lm.regress, model.n_tokens = lm.stu_regress_head, 5
    del lm.stu_regress_head, model.n_causal
    assert families.family_of(model).name == "emu3"
    expected = model.generate_image(["a photo of a cat", "a dog"])
    assert expected.shape == (2, 5, 64)
    emu_fast.accelerate(model)
    assert rel_err(model.generate_image(["a photo of a cat", "a dog"]), expected) < 1e-4


def test_not_an_emu_model_names_what_each_family_lacks():
    with pytest.raises(TypeError, match=r"Linear is not an Emu model emu_fast knows \(emu1, emu2, emu2-hub\): "
                                        r"as emu1 it lacks decoder.lm.model.layers.*as emu2 it lacks .*n_query"):
        families.family_of(torch.nn.Linear(2, 2))


def test_a_known_class_missing_a_part_is_told_that_part_first():
    model = tiny_emu2_hub()
    del model.project_up
    with pytest.raises(TypeError, match=r"TinyEmu2Hub is not an Emu model .*: as emu2-hub it lacks project_up;"):
        families.family_of(model)


def test_every_family_is_documented():
    """The checklist in docs/model-classes.md: each family has a row there and in the README."""
    from helpers import ROOT

    doc = (ROOT / "docs" / "model-classes.md").read_text()
    readme = (ROOT / "README.md").read_text()
    for family in families.FAMILIES:
        assert f"| `{family.name}` |" in doc, family.name
    assert "emu_fast.accelerate(pipe)" in readme and "AutoModelForCausalLM" in readme
    assert len([line for line in readme.splitlines() if line.startswith("| ") and "emu_fast.accelerate(" in line]) \
        >= len(families.FAMILIES)
