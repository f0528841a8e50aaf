"""Tiny offline Gemma 4 and Gemma 3n checkpoints (core/tiny/), loaded through the real code paths.

The checkpoints are the session fixtures of conftest.py (``gemma4_path``,
``gemma4_moe_path``, ``gemma4_vision_path``, ``gemma4_unified_path``,
``gemma3n_path``).  This file checks
that each one loads with transformers (the right class, no missing or unexpected
weights) and with ``mlx_lm.load``; the Gemma 4 tokenizer facts (control-token
ids, stop ids, one ``<bos>``); the real Gemma 4 chat template (system turn,
thinking on / off, tool declarations, tool calls and ``role: "tool"`` results);
and greedy parity between transformers and mlx-lm at the raw model level.
Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from core import tiny

FIXTURES = Path(__file__).resolve().parent / "fixtures"

#: arch -> (conftest fixture, transformers class, mlx-lm module)
CHECKPOINTS = {
    "gemma4_text": ("gemma4_path", "Gemma4ForCausalLM", "mlx_lm.models.gemma4_text"),
    "gemma4_moe": ("gemma4_moe_path", "Gemma4ForCausalLM", "mlx_lm.models.gemma4_text"),
    "gemma4": ("gemma4_vision_path", "Gemma4ForConditionalGeneration", "mlx_lm.models.gemma4"),
    # mlx-lm has no gemma4_unified module: its MODEL_REMAPPING loads it with gemma4's,
    # whose sanitize() drops the vision / audio embedders.
    "gemma4_unified": (
        "gemma4_unified_path",
        "Gemma4UnifiedForConditionalGeneration",
        "mlx_lm.models.gemma4",
    ),
    "gemma3n": ("gemma3n_path", "Gemma3nForCausalLM", "mlx_lm.models.gemma3n"),
}
GEMMA4_CONTROL = {
    "<pad>": 0,
    "<eos>": 1,
    "<bos>": 2,
    "<unk>": 3,
    "<mask>": 4,
    "<|tool>": 46,
    "<tool|>": 47,
    "<|tool_call>": 48,
    "<tool_call|>": 49,
    "<|tool_response>": 50,
    "<tool_response|>": 51,
    '<|"|>': 52,
    "<|think|>": 98,
    "<|channel>": 100,
    "<channel|>": 101,
    "<|turn>": 105,
    "<turn|>": 106,
}
N_NEW = 16  # greedy tokens compared across backends
LOGPROB_ATOL = 1e-3  # float32; measured ~1e-5 (~1e-4 across the sliding window)

Q = '<|"|>'  # Gemma 4's string delimiter
USER = [{"role": "user", "content": "Hello, how are you?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather for a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "days": {"type": "integer"},
                },
                "required": ["city"],
            },
        },
    }
]
TOOL_ROUND = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Tokyo?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Tokyo", "days": 3}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 22}'},
]


# --------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def ckpt(arch, request) -> Path:
    return request.getfixturevalue(CHECKPOINTS[arch][0])


@pytest.fixture(scope="module")
def hf_tok(ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ckpt)


def _load_hf(arch: str, path: Path):
    """The transformers model, as the checkpoint's own class loads it (float32)."""
    from transformers import AutoModelForCausalLM, Gemma3nForCausalLM

    # Gemma 3n: AutoModelForCausalLM builds Gemma3nForConditionalGeneration,
    # whose (timm) vision tower is not installed; the text model loads the
    # multimodal checkpoint's language_model weights by itself.
    cls = Gemma3nForCausalLM if arch == "gemma3n" else AutoModelForCausalLM
    return cls.from_pretrained(path, output_loading_info=True)


@pytest.fixture(scope="module")
def hf_model(arch, ckpt):
    model, info = _load_hf(arch, ckpt)
    return model.eval(), info


@pytest.fixture(scope="module")
def mlx_model(ckpt):
    import mlx_lm

    return mlx_lm.load(str(ckpt))


@pytest.fixture(scope="module")
def g4_tok(gemma4_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gemma4_path)


def _render(tok, messages, **kwargs) -> str:
    kwargs.setdefault("add_generation_prompt", True)
    return tok.apply_chat_template(messages, tokenize=False, **kwargs)


# --------------------------------------------------------------------------
# checkpoint files


def test_gemma4_template_is_the_real_one():
    real = (FIXTURES / "gemma4_chat_template.jinja").read_text("utf-8")
    for arch in tiny.GEMMA4_ARCHS:
        assert tiny.chat_template(arch) == real
    # Gemma 3's, except that image / audio parts are <image_soft_token> / <audio_soft_token>.
    assert tiny.chat_template("gemma3n") == (FIXTURES / "gemma3n_chat_template.jinja").read_text(
        "utf-8"
    )


def test_config_files(arch, ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    assert cfg["torch_dtype"] == cfg["dtype"] == "float32"
    assert text["vocab_size"] == 512 and text["tie_word_embeddings"] is True
    assert text["layer_types"][-1] == "full_attention"
    assert text["final_logit_softcapping"] == 30.0
    gen = json.loads((ckpt / "generation_config.json").read_text())
    assert (gen["pad_token_id"], gen["bos_token_id"], gen["do_sample"]) == (0, 2, True)
    if arch == "gemma3n":
        assert cfg["model_type"] == "gemma3n" and text["model_type"] == "gemma3n_text"
        assert cfg["architectures"] == ["Gemma3nForConditionalGeneration"]
        assert text["num_kv_shared_layers"] == 2 and text["hidden_size_per_layer_input"] == 64
        assert gen["eos_token_id"] == [1, 106]
        return
    assert gen["eos_token_id"] == [1, 106, 50]
    assert text["model_type"] == (
        "gemma4_unified_text" if arch == "gemma4_unified" else "gemma4_text"
    )
    # mlx-lm reads these from the top of the text config (transformers keeps
    # the global head dim in per_layer_config only).
    full = [i for i, t in enumerate(text["layer_types"]) if t == "full_attention"]
    assert {text["per_layer_config"][str(i)]["head_dim"] for i in full} == {text["global_head_dim"]}
    assert text["global_head_dim"] == 2 * text["head_dim"]
    assert text["rope_parameters"]["full_attention"]["rope_type"] == "proportional"
    if arch == "gemma4_moe":
        assert text["enable_moe_block"] and text["attention_k_eq_v"]
        assert (text["num_experts"], text["top_k_experts"]) == (32, 4)
        assert text["num_global_key_value_heads"] == 1 < text["num_key_value_heads"]
        assert text["num_kv_shared_layers"] == 0 and text["hidden_size_per_layer_input"] == 0
    elif arch == "gemma4_unified":
        # Like gemma-4-12B's config.json: K=V global attention, nothing of the E models or MoE.
        assert text["attention_k_eq_v"] and not text["enable_moe_block"]
        assert text["num_global_key_value_heads"] == 1 < text["num_key_value_heads"]
        assert text["num_kv_shared_layers"] == 0 and text["hidden_size_per_layer_input"] == 0
        assert not text["use_double_wide_mlp"] and text["use_bidirectional_attention"] == "vision"
        assert cfg["model_type"] == "gemma4_unified" and cfg["vocab_size"] == 512
        assert cfg["architectures"] == ["Gemma4UnifiedForConditionalGeneration"]
        assert cfg["vision_config"]["model_type"] == "gemma4_unified_vision"
        assert cfg["audio_config"]["model_type"] == "gemma4_unified_audio"
        assert cfg["image_token_id"] == tiny.special_token_ids(arch)["<|image|>"]
    else:
        assert not text["enable_moe_block"] and not text["attention_k_eq_v"]
        assert text["num_kv_shared_layers"] == 2 and text["use_double_wide_mlp"]
        assert text["hidden_size_per_layer_input"] == 64
    if arch == "gemma4":
        assert cfg["model_type"] == "gemma4" and cfg["vocab_size"] == 512  # mlx-lm needs it
        ids = tiny.special_token_ids(arch)
        assert (cfg["boi_token_id"], cfg["image_token_id"], cfg["eoi_token_id"]) == (
            ids["<|image>"],
            ids["<|image|>"],
            ids["<image|>"],
        )
        assert cfg["vision_config"]["model_type"] == "gemma4_vision"
        assert cfg["audio_config"]["model_type"] == "gemma4_audio"  # like E2B / E4B
        assert cfg["vision_config"]["pooling_kernel_size"] == tiny.GEMMA4_POOLING
        processor = json.loads((ckpt / "processor_config.json").read_text())
        assert processor["processor_class"] == "Gemma4Processor"
        assert processor["image_processor"]["max_soft_tokens"] == tiny.GEMMA4_IMAGE_SOFT_TOKENS
        assert processor["image_processor"]["pooling_kernel_size"] == tiny.GEMMA4_POOLING
        assert processor["feature_extractor"]["feature_size"] == 128


def test_every_mlx_model_arg_is_explicit(arch, ckpt):
    """mlx-lm fills missing keys with its own defaults (for the real E2B), not transformers'."""
    import importlib

    cfg = json.loads((ckpt / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    module = "gemma3n" if arch == "gemma3n" else "gemma4_text"
    args_cls = importlib.import_module(f"mlx_lm.models.{module}")
    fields = {
        f.name
        for f in dataclasses.fields(
            args_cls.TextConfig if arch == "gemma3n" else args_cls.ModelArgs
        )
    }
    assert sorted(fields - set(text)) == []


# --------------------------------------------------------------------------
# tokenizer


def test_gemma4_tokenizer_ids(g4_tok):
    tok = g4_tok
    assert type(tok).__name__ == "GemmaTokenizer" and len(tok) == 512
    assert tok.convert_tokens_to_ids(list(GEMMA4_CONTROL)) == list(GEMMA4_CONTROL.values())
    specials = set(tok.all_special_tokens)
    expected = tiny.special_token_ids("gemma4_text")
    assert GEMMA4_CONTROL.items() <= expected.items()
    assert set(expected) <= specials  # every control and media token is special
    media = [expected[t] for t in tiny.GEMMA4_MEDIA_TOKENS]
    assert media == list(range(505, 512))
    assert (tok.image_token, tok.boi_token, tok.eoi_token) == ("<|image|>", "<|image>", "<image|>")
    assert (tok.soc_token, tok.eoc_token, tok.escape_token) == ("<|channel>", "<channel|>", Q)
    assert tok.padding_side == "left"
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    # add_bos_token is false: the template writes <bos>, the tokenizer does not.
    assert (
        tok("Hello world")["input_ids"] == tok("Hello world", add_special_tokens=False)["input_ids"]
    )
    assert 2 not in tok("Hello world")["input_ids"]


def test_gemma4_no_double_bos(g4_tok):
    text = _render(g4_tok, USER)
    assert text.startswith("<bos><|turn>user\n")
    for special in (True, False):
        ids = g4_tok(text, add_special_tokens=special)["input_ids"]
        assert ids[:2] == [2, 105] and ids.count(2) == 1
    ids = g4_tok.apply_chat_template(USER, add_generation_prompt=True, return_dict=False)
    assert ids[:2] == [2, 105] and ids.count(2) == 1


def test_gemma4_round_trip_with_control_tokens(g4_tok):
    text = (
        f"<|channel>thought\nLet me see.<channel|><|tool_call>call:get_weather{{city:{Q}Tokyo"
        f"{Q},days:3}}<tool_call|><|tool_response>response:x{{value:{Q}ok{Q}}}<tool_response|>"
        "Done 🙂<turn|>"
    )
    ids = g4_tok(text, add_special_tokens=False)["input_ids"]
    for token, tid in GEMMA4_CONTROL.items():
        assert (tid in ids) == (token in text), token  # atomic, never split
    assert g4_tok.decode(ids, skip_special_tokens=False) == text
    # The pitfall: skip_special_tokens=True deletes every control token.
    stripped = g4_tok.decode(ids, skip_special_tokens=True)
    assert Q not in stripped and "<|tool_call>" not in stripped and "thought" in stripped


def test_gemma3n_tokenizer_is_gemma3s(gemma3n_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma3n_path)
    ids = tiny.special_token_ids("gemma3n")
    assert tok.convert_tokens_to_ids(list(ids)) == list(ids.values())
    assert ids["<start_of_turn>"] == 105 and ids["<end_of_turn>"] == 106
    text = _render(tok, [{"role": "system", "content": "Be brief."}, *USER])
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nHello, how are you?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert tok(text, add_special_tokens=False)["input_ids"][:2] == [2, 105]


# --------------------------------------------------------------------------
# the real Gemma 4 template


def test_template_turns_and_system(g4_tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    assert _render(g4_tok, messages, enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\nBe brief.<turn|>\n"
        "<|turn>user\nHi<turn|>\n<|turn>model\nHello.<turn|>\n"
        "<|turn>user\nBye<turn|>\n<|turn>model\n"
    )
    # thinking off: no <|think|>, and the 31B template closes an empty thought
    assert _render(g4_tok, messages, enable_thinking=False) == (
        "<bos><|turn>system\nBe brief.<turn|>\n"
        "<|turn>user\nHi<turn|>\n<|turn>model\nHello.<turn|>\n"
        "<|turn>user\nBye<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    )
    # no system message, no thinking, no tools: no system turn at all
    assert _render(g4_tok, USER, enable_thinking=False).startswith("<bos><|turn>user\n")
    # "developer" is a system turn too
    dev = _render(g4_tok, [{"role": "developer", "content": "Rules."}, *USER])
    assert dev.startswith("<bos><|turn>system\nRules.<turn|>\n<|turn>user\n")


def test_template_strips_earlier_thinking(g4_tok):
    messages = [
        *USER,
        {"role": "assistant", "content": "<|channel>thought\nsecret plan<channel|>Fine."},
        {"role": "user", "content": "Good."},
    ]
    text = _render(g4_tok, messages, enable_thinking=True)
    assert "secret plan" not in text and "<|turn>model\nFine.<turn|>\n" in text


def test_template_tools_call_and_result(g4_tok):
    text = _render(g4_tok, TOOL_ROUND, tools=TOOLS, enable_thinking=False)
    system, rest = text.split("<turn|>\n", 1)
    assert system.startswith("<bos><|turn>system\nBe brief.<|tool>declaration:get_weather{")
    assert f"description:{Q}Get the weather for a city.{Q}" in system
    assert f"city:{{description:{Q}City name{Q},type:{Q}STRING{Q}}}" in system
    assert f"required:[{Q}city{Q}]" in system and system.endswith("<tool|>")
    # the call (keys unquoted, strings in <|"|>) and its result, matched by
    # tool_call_id, in the same model turn; no new turn after a tool result
    assert rest == (
        "<|turn>user\nWeather in Tokyo?<turn|>\n<|turn>model\n"
        f"<|tool_call>call:get_weather{{city:{Q}Tokyo{Q},days:3}}<tool_call|>"
        f'<|tool_response>response:get_weather{{value:{Q}{{"temp": 22}}{Q}}}<tool_response|>'
    )
    # the model's answer after the result closes the turn
    answered = [*TOOL_ROUND, {"role": "assistant", "content": "It is 22."}, *USER]
    text = _render(g4_tok, answered, tools=TOOLS, enable_thinking=True)
    assert text.startswith("<bos><|turn>system\n<|think|>\nBe brief.<|tool>")
    assert "<tool_response|>It is 22.<turn|>\n<|turn>user\nHello, how are you?<turn|>\n" in text
    assert text.endswith("<|turn>model\n")
    # a tool call whose result has not arrived yet ends in <|tool_response>
    pending = _render(g4_tok, TOOL_ROUND[:3], tools=TOOLS)
    assert pending.endswith("<tool_call|><|tool_response>")


def test_template_reasoning_before_tool_call(g4_tok):
    messages = [dict(m) for m in TOOL_ROUND]
    messages[2]["reasoning_content"] = "Need the weather tool."
    text = _render(g4_tok, messages, tools=TOOLS, enable_thinking=True)
    assert "<|turn>model\n<|channel>thought\nNeed the weather tool.\n<channel|><|tool_call>" in text


def test_mlx_wrapper_renders_the_same(gemma4_path, g4_tok):
    import mlx_lm

    _, wrapper = mlx_lm.load(str(gemma4_path))
    assert wrapper.eos_token_ids == {1, 106, 50}
    assert wrapper.has_thinking and wrapper.think_end == "<channel|>"
    for thinking in (True, False):
        ids = wrapper.apply_chat_template(
            TOOL_ROUND, tools=TOOLS, add_generation_prompt=True, enable_thinking=thinking
        )
        expected = g4_tok.apply_chat_template(
            TOOL_ROUND,
            tools=TOOLS,
            add_generation_prompt=True,
            enable_thinking=thinking,
            return_dict=False,
        )
        assert ids == expected and ids.count(2) == 1
    # The pitfall: mlx-lm's wrapper turns thinking on unless told otherwise.
    default = wrapper.apply_chat_template(USER, add_generation_prompt=True, tokenize=False)
    assert "<|think|>" in default


# --------------------------------------------------------------------------
# loading


def test_transformers_loads(arch, hf_model):
    import torch

    model, info = hf_model
    assert type(model).__name__ == CHECKPOINTS[arch][1] and model.dtype == torch.float32
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    text = model.config.get_text_config()
    if arch == "gemma4_moe":
        assert hasattr(model.model.layers[0], "experts")
    elif arch == "gemma4":
        assert model.model.vision_tower is not None and model.model.audio_tower is not None
    elif arch == "gemma4_unified":
        # Encoder-free: embedders instead of towers; K=V global attention (no v_proj).
        assert not hasattr(model.model, "vision_tower") and not hasattr(model.model, "audio_tower")
        assert model.model.embed_vision is not None and model.model.embed_audio is not None
        layers = model.model.language_model.layers
        assert layers[-1].self_attn.v_proj is None and layers[0].self_attn.v_proj is not None
        assert not hasattr(layers[0], "per_layer_input_gate")
        return
    if arch != "gemma4_moe":
        # KV-shared layers have no k/v projections of their own
        layers = model.model.language_model.layers if arch == "gemma4" else model.model.layers
        shared = [i for i, layer in enumerate(layers) if not hasattr(layer.self_attn, "k_proj")]
        assert shared == list(range(text.num_hidden_layers - 2, text.num_hidden_layers))


def test_gemma3n_auto_class_needs_the_multimodal_model():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    # AutoModelForCausalLM builds the full multimodal model for "gemma3n", whose
    # vision tower needs timm; the text model (Gemma3nForCausalLM) does not.
    assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES["gemma3n"] == "Gemma3nForConditionalGeneration"
    assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES["gemma4"] == "Gemma4ForConditionalGeneration"
    assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES["gemma4_text"] == "Gemma4ForCausalLM"


def test_mlx_loads(arch, mlx_model):
    model, wrapper = mlx_model
    assert type(model).__module__ == CHECKPOINTS[arch][2]
    assert type(wrapper.detokenizer).__name__ == "SPMStreamingDetokenizer"
    assert wrapper.eos_token_ids == ({1, 106} if arch == "gemma3n" else {1, 106, 50})
    if arch == "gemma3n":
        return
    args = (model.language_model if arch in ("gemma4", "gemma4_unified") else model).args
    assert (args.vocab_size, args.hidden_size, args.final_logit_softcapping) == (512, 64, 30.0)
    layers = model.layers
    if arch == "gemma4_unified":
        assert args.attention_k_eq_v and not args.enable_moe_block
        assert args.num_kv_shared_layers == 0 and args.hidden_size_per_layer_input == 0
        full = layers[-1].self_attn
        assert full.use_k_eq_v and not hasattr(full, "v_proj") and full.n_kv_heads == 1
        assert full.head_dim == 32 and layers[0].self_attn.head_dim == 16
        assert [layer.mlp.gate_proj.weight.shape[0] for layer in layers] == [128, 128, 128]
    elif arch == "gemma4_moe":
        assert args.enable_moe_block and args.attention_k_eq_v and args.num_kv_shared_layers == 0
        full = layers[-1].self_attn
        assert full.use_k_eq_v and not hasattr(full, "v_proj") and full.n_kv_heads == 1
        assert full.head_dim == 32 and layers[0].self_attn.head_dim == 16
    else:
        assert args.num_kv_shared_layers == 2 and args.hidden_size_per_layer_input == 64
        assert [layer.self_attn.has_kv for layer in layers] == [True, True, False, False]
        # double-wide MLP in the KV-shared layers
        assert [layer.mlp.gate_proj.weight.shape[0] for layer in layers] == [128, 128, 256, 256]
        assert layers[1].self_attn.head_dim == 64 and layers[0].self_attn.head_dim == 32


def test_bfloat16_gemma4(tmp_path):
    import mlx.core as mx
    import mlx_lm
    import torch
    from transformers import AutoModelForCausalLM

    path = tiny.build_tiny_checkpoint(tmp_path / "bf16", "gemma4_moe", dtype="bfloat16")
    assert AutoModelForCausalLM.from_pretrained(path).dtype == torch.bfloat16
    model, _ = mlx_lm.load(str(path))
    assert model.layers[0].self_attn.q_proj.weight.dtype == mx.bfloat16


def test_mlx_4bit_convert_loads_and_generates(arch, ckpt, tmp_path):
    import mlx.core as mx
    import mlx.nn as nn
    import mlx_lm
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    out = tmp_path / "mlx-4bit"
    mlx_lm.convert(str(ckpt), str(out), quantize=True, q_bits=4, q_group_size=64)
    model, wrapper = mlx_lm.load(str(out))
    q_proj = model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, nn.QuantizedLinear) and q_proj.bits == 4
    prompt = mx.array(wrapper.encode("<bos><|turn>user\nHi", add_special_tokens=False))
    toks = [
        int(t) for t, _ in generate_step(prompt, model, max_tokens=4, sampler=make_sampler(0.0))
    ]
    assert len(toks) == 4 and all(0 <= t < 512 for t in toks)


@pytest.mark.parametrize("bnb_arch", ["gemma4_text", "gemma4_moe", "gemma4", "gemma4_unified"])
def test_bnb_nf4_on_cpu(bnb_arch, request):
    """Every Linear but the tied lm_head is 4-bit (the router too: 32 experts pack on CPU)."""
    import torch

    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = request.getfixturevalue(CHECKPOINTS[bnb_arch][0])
    qcfg = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qcfg, device_map="cpu")
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantized = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert linears - quantized == {"lm_head"} and len(quantized) >= 20
    x = torch.tensor([[2, 105, 50, 60]])
    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=3)
    assert out.shape[1] == 4 + 3


# --------------------------------------------------------------------------
# cross-backend parity (raw models, float32, greedy)


def _prompt(tok, arch: str) -> list[int]:
    messages = [{"role": "user", "content": "Write a short poem about the sea."}]
    kwargs = {} if arch == "gemma3n" else {"enable_thinking": False}
    text = _render(tok, messages, **kwargs)
    return tok.encode(text, add_special_tokens=False)


def _hf_greedy(model, ids: list[int], stop: bool):
    import torch

    x = torch.tensor([ids])
    kwargs = {} if stop else {"eos_token_id": None}  # None: never stop early
    out = model.generate(
        x,
        attention_mask=torch.ones_like(x),
        do_sample=False,
        max_new_tokens=N_NEW,
        output_scores=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    logprobs = [torch.log_softmax(s[0].float(), -1).numpy() for s in out.scores]
    return out.sequences[0, len(ids) :].tolist(), logprobs


def _mlx_greedy(model, wrapper, ids: list[int], stop: bool):
    import mlx.core as mx
    import numpy as np
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    eos = wrapper.eos_token_ids
    if not stop:
        wrapper.eos_token_ids = set()
    try:
        responses = list(
            stream_generate(model, wrapper, ids, max_tokens=N_NEW, sampler=make_sampler(temp=0.0))
        )
    finally:
        wrapper.eos_token_ids = eos
    logprobs = [np.array(r.logprobs.astype(mx.float32)) for r in responses]
    return [r.token for r in responses], logprobs, responses[-1].finish_reason


def test_greedy_parity(arch, hf_tok, hf_model, mlx_model):
    import numpy as np

    ids = _prompt(hf_tok, arch)
    assert ids.count(2) == 1
    hf_ids, hf_lp = _hf_greedy(hf_model[0], ids, stop=False)
    mlx_ids, mlx_lp, finish = _mlx_greedy(*mlx_model, ids, stop=False)
    assert len(hf_ids) == N_NEW and finish == "length"
    assert hf_ids == mlx_ids
    assert len(set(hf_ids)) >= 4, "degenerate output makes a weak parity check"
    diff = max(float(np.abs(a - b).max()) for a, b in zip(hf_lp, mlx_lp, strict=True))
    assert diff < LOGPROB_ATOL


def test_greedy_parity_with_stop_ids(arch, hf_tok, hf_model, mlx_model):
    """Both stop on the same generation-config end id (or both run to the limit)."""
    ids = _prompt(hf_tok, arch) + hf_tok.encode("The sea", add_special_tokens=False)
    hf_ids, _ = _hf_greedy(hf_model[0], ids, stop=True)
    mlx_ids, _, finish = _mlx_greedy(*mlx_model, ids, stop=True)
    assert hf_ids == mlx_ids
    stops = set(tiny.eos_token_ids(arch))
    assert finish == ("stop" if hf_ids[-1] in stops else "length")


def test_greedy_parity_across_sliding_window(arch, hf_model, mlx_model):
    """A 540-token prompt crosses the 512-token sliding window."""
    import numpy as np

    ids = [2, *np.random.RandomState(1).randint(5, 500, 539).tolist()]
    hf_ids, _ = _hf_greedy(hf_model[0], ids, stop=False)
    mlx_ids, _, _ = _mlx_greedy(*mlx_model, ids, stop=False)
    assert hf_ids == mlx_ids
