"""Rows that come and go (EmuDecoder.admit / retire, what emu_fast.Engine is built on): prompts
admitted into a decoder whose other rows are mid-loop, and rows retired while others go on, give
each prompt the outputs generate() gives it alone, on every kernel set and both families."""
import pytest
import torch

from emu_fast.testing import rel_err

from decoder_setup import LOOP_TOL, Setup

TEXTS = ["a photo of a cat", "an oil painting of a dog riding a bicycle at dawn", "hi", "[<IMG_PLH>] again"]


def solo(setup, decoder, text):
    embeds, mask = setup.inputs([text])
    return decoder.generate(embeds, mask, setup.n)[0]


def run_staggered(setup, decoder, arrivals, retire_early=()):
    """Admits TEXTS[i] at step arrivals[i] (one row each), steps every active row once per
    iteration, retires a row after its n-th output (and rows in retire_early after 2 outputs).
    Returns each text's outputs [got, D]."""
    decoder.reset()
    rows, outputs, step = [], {}, 0  # rows: text index per active row, in row order
    while len(outputs) < len(arrivals) or rows:
        new = [i for i, t in enumerate(arrivals) if t == step]
        if new:
            embeds, masks = zip(*(setup.inputs([TEXTS[i]]) for i in new))
            width = max(e.shape[1] for e in embeds)
            first = decoder.admit(torch.cat([torch.nn.functional.pad(e, (0, 0, 0, width - e.shape[1])) for e in embeds]),
                                  torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in masks]),
                                  setup.n - 1)
            for j, i in enumerate(new):
                outputs[i] = [first[j]]
            rows += new
        elif rows:
            prev = torch.stack([outputs[i][-1] for i in rows])
            out = decoder.step(prev)
            for j, i in enumerate(rows):
                outputs[i].append(out[j])
        done = [j for j, i in enumerate(rows)
                if len(outputs[i]) == setup.n or (i in retire_early and len(outputs[i]) == 2)]
        if done:
            decoder.retire(done[::-1])  # any order
            rows = [i for j, i in enumerate(rows) if j not in done]
            assert decoder.batch_size == len(rows)
        step += 1
    return {i: torch.stack(o) for i, o in outputs.items()}


# the decoder variants rows must work on: kernel sets, a model cut into segments, quantized weights
VARIANTS = {"auto": {}, "aten": {"kernels": "aten"}, "op_by_op": {"kernels": "custom", "fused": False},
            "split": {"split_before": [1]}, "int4": {"weights": "int4", "group_size": 32},
            "int8_split": {"weights": "int8", "split_before": [1]}}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", ["emu1", "emu2"])
def test_staggered_rows_equal_each_prompt_alone(emu_tokenizer, kind, variant):
    setup = Setup(kind, emu_tokenizer, kv_heads=2, n=6)
    kw = dict(VARIANTS[variant])
    fused = kw.pop("fused", True)
    decoder = setup.decoder(**kw)
    decoder.fused_cpu_step = fused
    alone = [solo(setup, decoder, t) for t in TEXTS]
    got = run_staggered(setup, decoder, arrivals=[0, 0, 2, 3], retire_early=(1,))
    for i, t in enumerate(TEXTS):
        expected = alone[i][: got[i].shape[0]]
        assert rel_err(got[i], expected) < LOOP_TOL[torch.float32], (kind, t)
    assert got[1].shape[0] == 2 and got[0].shape[0] == setup.n


def test_admitted_rows_keep_their_padding(emu_tokenizer):
    """A left-padded batch admitted as is keeps upstream's positions (each row's padding), so it
    equals generate() on the same batch."""
    setup = Setup("emu2", emu_tokenizer, n=4)
    decoder = setup.decoder()
    embeds, mask = setup.inputs(TEXTS[:3])
    expected = decoder.generate(embeds, mask, setup.n)
    decoder.reset()
    decoder.admit(*setup.inputs(["hi there"]), setup.n - 1)  # a row in progress before them
    first = decoder.admit(embeds, mask, setup.n - 1)
    outs = [first]
    prev = torch.cat([torch.zeros(1, first.shape[1]), first])
    for _ in range(setup.n - 1):
        prev = decoder.step(prev)
        outs.append(prev[1:])
    assert rel_err(torch.stack(outs, 1), expected) < LOOP_TOL[torch.float32]


def test_admit_and_retire_refuse_bad_input_and_stay_usable(emu_tokenizer):
    setup = Setup("emu1", emu_tokenizer, n=3)
    decoder = setup.decoder(max_batch=2, max_seq_len=32)
    embeds, mask = setup.inputs(["a photo of a cat"])
    decoder.admit(embeds, mask, setup.n - 1)
    with pytest.raises(ValueError, match="max_seq_len of 32"):
        decoder.admit(embeds[:, :1], mask[:, :1], 32)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        decoder.admit(embeds, mask, -1)
    decoder.admit(embeds, mask, setup.n - 1)
    with pytest.raises(ValueError, match="max_batch of 2"):
        decoder.admit(embeds, mask, setup.n - 1)
    for rows, message in (([2], "row 2 is not active"), ([-1], "row -1 is not active"), ([0, 0], "given twice")):
        with pytest.raises(ValueError, match=message):
            decoder.retire(rows)
    assert decoder.batch_size == 2
    decoder.retire([0])
    assert decoder.batch_size == 1
    decoder.step(torch.zeros(1, decoder.output_size, dtype=torch.float32))
    decoder.retire([0])
    assert decoder.batch_size == 0 and decoder.lengths == []
    decoder.admit(embeds, mask, setup.n - 1)  # reuses the freed rows
    assert decoder.batch_size == 1
