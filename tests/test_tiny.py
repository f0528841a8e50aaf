"""Tiny offline Gemma checkpoints (core/tiny/), loaded through the real code paths.

Every checkpoint is built once per module; the whole file runs in well under
a minute on 2 CPU cores.  Nothing is downloaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core import tiny

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
PACKAGED = ROOT / "core" / "chat_templates"

N_NEW = 24  # greedy tokens compared across backends
# Max |logprob| difference per step between transformers and MLX (float32).
# gemma3*: mlx-lm rounds the sqrt(hidden_size) embedding scale to bf16 (~1e-4);
# gemma: mlx-lm uses erf GELU where transformers uses the tanh approximation.
LOGPROB_ATOL = {"gemma3_text": 2e-3, "gemma3": 2e-3, "gemma2": 1e-4, "gemma": 2e-2}

MESSAGES = [
    {"role": "user", "content": "Hello, how are you?"},
    {"role": "assistant", "content": "Fine, thanks."},
    {"role": "user", "content": "Tell me about café naïve 日本語 🙂"},
]
MULTIBYTE = "café naïve — 日本語のテキスト 🙂🎉"


# --------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module", params=tiny.GEMMA3_ARCHS)
def arch(request):
    return request.param


_built: dict = {}


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    """arch -> path of a float32 checkpoint, built lazily, once per module."""

    def get(arch: str) -> Path:
        if arch not in _built:
            _built[arch] = tiny.build_tiny_checkpoint(tmp_path_factory.mktemp(arch) / "ckpt", arch)
        return _built[arch]

    yield get
    _built.clear()


@pytest.fixture(scope="module")
def ckpt(arch, ckpt_dir):
    return ckpt_dir(arch)


@pytest.fixture(scope="module")
def hf_tok(ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def hf_model(ckpt):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt).eval()


@pytest.fixture(scope="module")
def mlx_model(ckpt):
    import mlx_lm

    return mlx_lm.load(str(ckpt))


def _prompt_ids(tok, messages=MESSAGES) -> list[int]:
    """Render the chat template, then tokenize without adding a second BOS."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


# --------------------------------------------------------------------------
# templates & module hygiene


def test_packaged_templates_identical_to_fixtures():
    fixtures = sorted(p.name for p in FIXTURES.glob("*.jinja"))
    packaged = sorted(p.name for p in PACKAGED.glob("*.jinja"))
    assert (
        fixtures
        == packaged
        == [
            "gemma2_chat_template.jinja",
            "gemma3_chat_template.jinja",
            "gemma3n_chat_template.jinja",
            "gemma4_chat_template.jinja",
        ]
    )
    for name in fixtures:
        assert (PACKAGED / name).read_bytes() == (FIXTURES / name).read_bytes(), name


def test_chat_template_is_the_packaged_one(arch):
    name = "gemma3" if arch.startswith("gemma3") else "gemma2"
    assert tiny.chat_template(arch) == (FIXTURES / f"{name}_chat_template.jinja").read_text("utf-8")


def test_import_is_light():
    code = (
        "import sys, core.tiny; "
        "heavy = {'torch', 'transformers', 'tokenizers', 'safetensors', 'mlx'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_unknown_arch_and_dtype_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown arch"):
        tiny.build_tiny_checkpoint(tmp_path / "x", "llama")
    with pytest.raises(ValueError, match="dtype"):
        tiny.build_tiny_checkpoint(tmp_path / "x", dtype="int8")
    with pytest.raises(ValueError, match="too small"):
        tiny.build_tokenizer(tmp_path / "t", vocab_size=300)


# --------------------------------------------------------------------------
# tokenizer


def test_tokenizer_special_ids(arch, hf_tok):
    expected = tiny.special_token_ids(arch)
    assert {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}.items() <= expected.items()
    assert expected["<start_of_turn>"] == 105 and expected["<end_of_turn>"] == 106
    assert hf_tok.convert_tokens_to_ids(list(expected)) == list(expected.values())
    assert len(hf_tok) == 512 == len(hf_tok.get_vocab())
    assert (hf_tok.pad_token_id, hf_tok.eos_token_id, hf_tok.bos_token_id, hf_tok.unk_token_id) == (
        0,
        1,
        2,
        3,
    )
    assert type(hf_tok).__name__ == "GemmaTokenizer"
    # the low ids around the specials are ordinary tokens
    low = hf_tok.convert_ids_to_tokens(list(range(5, 105)))
    assert not [t for t in low if t in expected or t.startswith(("<0x", "<unused"))]
    if arch == "gemma3":
        assert [expected[t] for t in tiny.IMAGE_TOKENS] == [509, 510, 511]
        assert (hf_tok.boi_token, hf_tok.eoi_token, hf_tok.image_token) == tiny.IMAGE_TOKENS
    else:
        assert "<start_of_image>" not in hf_tok.get_vocab()


def test_tokenizer_bos_post_processor(hf_tok):
    with_bos = hf_tok("Hello world")["input_ids"]
    without = hf_tok("Hello world", add_special_tokens=False)["input_ids"]
    assert with_bos == [2, *without] and without[0] != 2
    # Rendering the template already emits <bos>; tokenizing the rendered text
    # with add_special_tokens=True therefore yields a detectable double BOS.
    text = hf_tok.apply_chat_template(MESSAGES[:1], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<bos><start_of_turn>user\n")
    assert hf_tok(text)["input_ids"][:3] == [2, 2, 105]
    assert hf_tok(text, add_special_tokens=False)["input_ids"][:2] == [2, 105]


@pytest.mark.parametrize(
    "text",
    ["Hello world", " leading and trailing  ", "line1\n\n\tline2", MULTIBYTE, "a<b>c </s> [x]"],
)
def test_tokenizer_round_trip(hf_tok, text):
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    assert hf_tok.decode(ids) == text
    assert hf_tok.decode(hf_tok(text)["input_ids"], skip_special_tokens=True) == text


def test_tokenizer_splits_multibyte_characters(hf_tok):
    for ch in ("🙂", "日"):
        ids = hf_tok(ch, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(ch.encode("utf-8"))  # one byte-fallback token per byte
        assert hf_tok.decode(ids[:1]) == "\ufffd"  # a lone partial byte
        assert hf_tok.decode(ids) == ch
    assert len(hf_tok("é", add_special_tokens=False)["input_ids"]) == 1


def test_tokenizer_specials_are_atomic_and_skippable(hf_tok):
    ids = hf_tok("<start_of_turn>user\nhi<end_of_turn>\n", add_special_tokens=False)["input_ids"]
    assert ids[0] == 105 and 106 in ids
    assert hf_tok.decode(ids, skip_special_tokens=True) == "user\nhi\n"
    assert hf_tok.decode([2, 105, 106, 1, 0], skip_special_tokens=True) == ""


def test_template_rendering(arch, hf_tok):
    def render(msgs):
        return hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    text = render(MESSAGES)
    assert text == (
        "<bos><start_of_turn>user\nHello, how are you?<end_of_turn>\n"
        "<start_of_turn>model\nFine, thanks.<end_of_turn>\n"
        "<start_of_turn>user\nTell me about café naïve 日本語 🙂<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    system = [{"role": "system", "content": "Be brief."}, MESSAGES[0]]
    if arch.startswith("gemma3"):
        assert render(system).startswith("<bos><start_of_turn>user\nBe brief.\n\nHello")
    else:
        with pytest.raises(Exception, match="System role not supported"):
            render(system)
    with pytest.raises(Exception, match="must alternate"):
        render([MESSAGES[0], MESSAGES[0]])


def test_build_tokenizer_standalone(tmp_path):
    from transformers import AutoTokenizer

    tiny.build_tokenizer(tmp_path, arch="gemma2", vocab_size=640)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= names
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text("utf-8"))
    assert cfg["chat_template"] == tiny.chat_template("gemma2")
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"], cfg["unk_token"]) == (
        "<bos>",
        "<eos>",
        "<pad>",
        "<unk>",
    )
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == 640
    assert tok.decode(tok(MULTIBYTE)["input_ids"], skip_special_tokens=True) == MULTIBYTE


# --------------------------------------------------------------------------
# checkpoint files


def test_checkpoint_files(arch, ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["model_type"] == arch
    assert cfg["torch_dtype"] == cfg["dtype"] == "float32"
    assert cfg["vocab_size"] == 512 and cfg["tie_word_embeddings"] is True
    text = cfg.get("text_config", cfg)
    assert text["vocab_size"] == 512 and text["hidden_size"] == 128
    if arch.startswith("gemma3"):
        assert text["sliding_window_pattern"] == 2 and text["sliding_window"] == 512
        assert text["layer_types"] == ["sliding_attention", "full_attention"]
        assert text["query_pre_attn_scalar"] == 64
        assert (text["rope_theta"], text["rope_local_base_freq"]) == (1e6, 1e4)
    if arch == "gemma2":
        assert cfg["query_pre_attn_scalar"] == 64
        assert (cfg["attn_logit_softcapping"], cfg["final_logit_softcapping"]) == (50.0, 30.0)
    if arch == "gemma3":
        assert cfg["architectures"] == ["Gemma3ForConditionalGeneration"]
        vision = cfg["vision_config"]
        side = vision["image_size"] // vision["patch_size"]
        per_side = int(cfg["mm_tokens_per_image"] ** 0.5)
        assert per_side**2 == cfg["mm_tokens_per_image"] and side % per_side == 0
        assert [cfg[f"{k}_token_index"] for k in ("boi", "eoi", "image")] == [509, 510, 511]
        proc = json.loads((ckpt / "processor_config.json").read_text())
        assert proc["image_seq_length"] == cfg["mm_tokens_per_image"]
    gen = json.loads((ckpt / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["pad_token_id"], gen["bos_token_id"]) == ([1, 106], 0, 2)


def test_bfloat16_checkpoint(tmp_path):
    import mlx.core as mx
    import mlx_lm
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    path = tiny.build_tiny_checkpoint(tmp_path / "bf16", "gemma3_text", dtype="bfloat16")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"
    with safe_open(path / "model.safetensors", "pt") as f:
        names = f.keys()
        assert {f.get_tensor(k).dtype for k in names} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(path).dtype == torch.bfloat16
    model, _ = mlx_lm.load(str(path))
    assert model.layers[0].self_attn.q_proj.weight.dtype == mx.bfloat16


def test_rebuild_is_deterministic_and_overwrites(tmp_path):
    a = tiny.build_tiny_checkpoint(tmp_path / "a", "gemma3_text", num_hidden_layers=1)
    (a / "stale.txt").write_text("x")
    tiny.build_tiny_checkpoint(a, "gemma3_text", num_hidden_layers=1)
    assert not (a / "stale.txt").exists()
    b = tiny.build_tiny_checkpoint(tmp_path / "b", "gemma3_text", num_hidden_layers=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


# --------------------------------------------------------------------------
# transformers


def test_transformers_loads_and_generates(arch, hf_model, hf_tok):
    import torch

    expected = {
        "gemma3_text": "Gemma3ForCausalLM",
        "gemma3": "Gemma3ForConditionalGeneration",
        "gemma2": "Gemma2ForCausalLM",
        "gemma": "GemmaForCausalLM",
    }[arch]
    assert type(hf_model).__name__ == expected and hf_model.dtype == torch.float32
    ids = torch.tensor([_prompt_ids(hf_tok)])
    out = hf_model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=5
    )
    assert out.shape[1] > ids.shape[1]
    assert isinstance(hf_tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True), str)


def test_gemma3_processor_with_image(ckpt_dir):
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoProcessor

    path = ckpt_dir("gemma3")
    proc = AutoProcessor.from_pretrained(path)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert "<start_of_image>" in text
    rng = np.random.RandomState(0)
    images = [Image.fromarray((rng.rand(40, 56, 3) * 255).astype("uint8")) for _ in range(2)]
    inputs = [
        proc(text=text, images=im, return_tensors="pt", add_special_tokens=False) for im in images
    ]
    ids = inputs[0]["input_ids"][0].tolist()
    assert ids[:2] == [2, 105] and ids.count(511) == tiny.MM_TOKENS_PER_IMAGE
    assert inputs[0]["pixel_values"].shape == (1, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        a, b = (model(**x).logits[0, -1] for x in inputs)
    assert not torch.allclose(a, b)  # the image reaches the language model
    out = model.generate(**inputs[0], do_sample=False, max_new_tokens=3)
    assert out.shape[1] == len(ids) + 3


# --------------------------------------------------------------------------
# MLX


def test_mlx_loads_and_streams(arch, mlx_model):
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    model, wrapper = mlx_model
    assert type(model).__module__ == f"mlx_lm.models.{arch}"
    # the same streaming detokenizer mlx-lm picks for the real Gemma tokenizer
    assert type(wrapper.detokenizer).__name__ == "SPMStreamingDetokenizer"
    assert wrapper.eos_token_ids == {1, 106}
    prompt = wrapper.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert prompt == _prompt_ids(wrapper) and prompt[:2] == [2, 105]  # one BOS
    responses = list(
        stream_generate(model, wrapper, prompt, max_tokens=8, sampler=make_sampler(temp=0.0))
    )
    assert 1 <= len(responses) <= 8 and responses[-1].finish_reason in ("length", "stop")


def test_mlx_streaming_detokenizer_multibyte(mlx_model):
    _, wrapper = mlx_model
    detok = wrapper.detokenizer
    detok.reset()
    pieces = []
    for t in wrapper.encode(MULTIBYTE, add_special_tokens=False):
        detok.add_token(t)
        pieces.append(detok.last_segment)
    detok.finalize()
    pieces.append(detok.last_segment)
    assert "".join(pieces) == MULTIBYTE and "\ufffd" not in "".join(pieces)


def test_mlx_4bit_convert_loads_and_generates(arch, ckpt, tmp_path):
    import mlx.core as mx
    import mlx.nn as nn
    import mlx_lm
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    out = tmp_path / "mlx-4bit"
    mlx_lm.convert(str(ckpt), str(out), quantize=True, q_bits=4, q_group_size=64)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["group_size"] == 64
    model, wrapper = mlx_lm.load(str(out))
    q_proj = model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, nn.QuantizedLinear) and q_proj.bits == 4
    prompt = mx.array(wrapper.apply_chat_template(MESSAGES, add_generation_prompt=True))
    toks = [
        t for t, _ in generate_step(prompt, model, max_tokens=6, sampler=make_sampler(temp=0.0))
    ]
    assert len(toks) == 6 and all(0 <= int(t) < 512 for t in toks)


# --------------------------------------------------------------------------
# bitsandbytes


@pytest.mark.parametrize("bnb_arch", ["gemma3_text", "gemma3", "gemma2", "gemma"])
def test_bnb_nf4_on_cpu(bnb_arch, ckpt_dir):
    import torch

    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    path = ckpt_dir(bnb_arch)
    qcfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qcfg, device_map="cpu")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantized = {n: m for n, m in linears.items() if isinstance(m, bnb.nn.Linear4bit)}
    assert set(linears) - set(quantized) == {"lm_head"}  # tied to the embedding, kept
    assert len(quantized) >= 7 * 2
    for name, m in quantized.items():
        assert m.weight.quant_state.quant_type == "nf4", name
        # shapes the CPU 4-bit kernel accepts (it asserts on them when packing)
        assert m.out_features % 32 == 0 and m.in_features % 64 == 0, name
    tok = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor([_prompt_ids(tok)])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=4
    )
    assert out.shape[1] > ids.shape[1]


# --------------------------------------------------------------------------
# cross-backend parity


def _hf_greedy(model, ids: list[int], n: int):
    import torch

    x = torch.tensor([ids])
    out = model.generate(
        x,
        attention_mask=torch.ones_like(x),
        do_sample=False,
        max_new_tokens=n,
        eos_token_id=None,  # never stop early: compare all n tokens
        output_scores=True,
        return_dict_in_generate=True,
    )
    logprobs = [torch.log_softmax(s[0].float(), -1).numpy() for s in out.scores]
    return out.sequences[0, len(ids) :].tolist(), logprobs


def _mlx_greedy(model, ids: list[int], n: int, **kwargs):
    import mlx.core as mx
    import numpy as np
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    toks, logprobs = [], []
    for tok, lp in generate_step(
        mx.array(ids), model, max_tokens=n, sampler=make_sampler(temp=0.0), **kwargs
    ):
        toks.append(int(tok))
        logprobs.append(np.array(lp.astype(mx.float32)))
    return toks, logprobs


def test_greedy_parity_transformers_vs_mlx(arch, hf_model, hf_tok, mlx_model):
    import numpy as np

    ids = _prompt_ids(hf_tok)
    hf_ids, hf_lp = _hf_greedy(hf_model, ids, N_NEW)
    mlx_ids, mlx_lp = _mlx_greedy(mlx_model[0], ids, N_NEW)
    assert hf_ids == mlx_ids
    assert len(set(hf_ids)) >= 3, "degenerate output makes a weak parity check"
    diff = max(float(np.abs(a - b).max()) for a, b in zip(hf_lp, mlx_lp, strict=True))
    assert diff < LOGPROB_ATOL[arch]


def test_greedy_parity_across_sliding_window(ckpt_dir):
    """A 700-token prompt crosses gemma3_text's 512-token sliding window."""
    import mlx_lm
    import numpy as np
    from transformers import AutoModelForCausalLM

    path = ckpt_dir("gemma3_text")
    ids = [2, *np.random.RandomState(0).randint(5, 500, 699).tolist()]
    hf_ids, _ = _hf_greedy(AutoModelForCausalLM.from_pretrained(path).eval(), ids, 16)
    model, _ = mlx_lm.load(str(path))
    assert _mlx_greedy(model, ids, 16)[0] == hf_ids
    assert _mlx_greedy(model, ids, 16, prefill_step_size=128)[0] == hf_ids
