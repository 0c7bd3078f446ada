"""Generation under left padding, logit by logit: every decode step's logits equal a full recompute of
that row alone, without padding, to ~1e-5 (rows left-padded by different amounts), for both generate
paths: the native ``LlavitForConditionalGeneration.generate`` and Hugging Face ``generate`` on a
converted model.

Comparing argmax tokens (tests/test_model.py, tests/test_generation.py) misses small drifts: decode
positions that ignore the left padding move the logits of a tiny random model by ~5e-4, which never
flips its argmax; the clean code agrees to ~1e-7.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llavit_kernels.data import SYNTHETIC_WORDS, SampleProcessor, WordTokenizer, synthetic_samples  # noqa: E402
from llavit_kernels.train.demo import DemoSize, build_tiny  # noqa: E402
from llavit_kernels.train.evaluate import build_prompt_ids  # noqa: E402

from test_integration_transformers import IMAGE_ID, IMAGE_TOKENS, convert, make_llava, make_text_model, perturb_image_weights  # noqa: E402

SIZE = DemoSize(image_size=32, patch_size=8, vision_hidden=32, vision_layers=3, text_hidden=32, text_layers=2)
TOL = dict(rtol=0, atol=1e-5)
STEPS = 5


def _left_pad(rows):
    """[B, T] ids and mask, each row left-padded to the longest."""
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = torch.tensor(r)
        mask[b, T - len(r):] = 1
    return ids, mask


def _check_paddings(mask):
    pads = (mask == 0).sum(1).tolist()
    assert len(set(pads)) == len(pads) and min(pads) == 0 and max(pads) >= 3, f"want distinct left paddings: {pads}"
    return pads


def test_native_generate_decode_logits_equal_unpadded_recompute():
    tok = WordTokenizer(SYNTHETIC_WORDS)
    model = build_tiny(tok, SIZE).eval()
    with torch.no_grad():  # image q/k/v unlike the text ones, so a wrong routing would show too
        for name, p in model.named_parameters():
            if "_proj_image." in name:
                p.add_(0.3 * torch.randn_like(p))
    proc = SampleProcessor(tok, SIZE.image_size, 16, 128)
    samples, prompts = [], []
    for s in synthetic_samples(40, 3, 2, SIZE.image_size):  # three prompts of different lengths
        p = build_prompt_ids(tok, s["conversations"], 16)
        if len(p) not in {len(q) for q in prompts}:
            samples.append(s)
            prompts.append(p)
        if len(prompts) == 3:
            break
    ids, mask = _left_pad(prompts)
    pads = _check_paddings(mask)
    pix = torch.stack([proc.load_images(s)[0] for s in samples])

    step_logits = []
    hook = model.language_model.register_forward_hook(lambda m, args, out: step_logits.append(out[:, -1].clone()))
    try:
        new = model.generate(ids, pix, mask, max_new_tokens=STEPS, eos_token_id=-1)  # never stop early
    finally:
        hook.remove()
    assert new.shape == (3, STEPS) and len(step_logits) == STEPS  # prefill + STEPS - 1 decode steps

    with torch.no_grad():
        for b, prompt in enumerate(prompts):
            cur = torch.tensor(prompt)[None]
            for t in range(STEPS):
                logits, _ = model(cur, pix[b:b + 1])  # this row alone, no padding, no cache
                torch.testing.assert_close(step_logits[t][b], logits[0, -1], **TOL,
                                           msg=lambda m: f"row {b} (left pad {pads[b]}), step {t}: {m}")
                cur = torch.cat([cur, new[b, t].view(1, 1)], 1)


def _image_rows(lengths, image_starts, seed=3):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n, s in zip(lengths, image_starts):
        r = torch.randint(1, IMAGE_ID - 1, (n,), generator=gen)
        r[s:s + IMAGE_TOKENS] = IMAGE_ID
        rows.append(r.tolist())
    return rows


@pytest.mark.parametrize("family", ["qwen2", "llava"])
def test_hf_generate_decode_logits_equal_unpadded_recompute(family):
    plain = make_llava("qwen2") if family == "llava" else make_text_model("qwen2")
    model = convert(plain)
    perturb_image_weights(model, scale=1.0)
    rows = _image_rows(lengths=(24, 22, 19), image_starts=(3, 2, 1))
    ids, mask = _left_pad(rows)
    pads = _check_paddings(mask)
    pix = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(5)) if family == "llava" else None
    extra = {} if pix is None else {"pixel_values": pix}
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, min_new_tokens=STEPS,
                         do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                         suppress_tokens=[IMAGE_ID],  # (a generated image token would need an image to recompute)
                         **extra)
    new = out.sequences[:, ids.shape[1]:]
    assert new.shape == (3, STEPS) and len(out.logits) == STEPS
    with torch.no_grad():
        for b, row in enumerate(rows):
            cur = torch.tensor(row)[None]
            row_extra = {} if pix is None else {"pixel_values": pix[b:b + 1]}
            for t in range(STEPS):
                logits = model(input_ids=cur, use_cache=False, **row_extra).logits
                torch.testing.assert_close(out.logits[t][b], logits[0, -1], **TOL,
                                           msg=lambda m: f"row {b} (left pad {pads[b]}), step {t}: {m}")
                cur = torch.cat([cur, new[b, t].view(1, 1)], 1)
