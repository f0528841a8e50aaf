"""Gemma 4 and Gemma 3n through the core clients, on both backends.

Three tiers, fastest first:

* a scripted fake backend (:class:`~test_core_support.Gemma4ScriptedClient`:
  the tiny Gemma 4 tokenizer, no model, a script of token ids per request)
  for the exact reasoning / content / tool-call split of ``create()``,
  ``create(stream=True)`` and :func:`~core.stream.fold_deltas`, however the
  thinking channel's text is cut into tokens;
* the real tiny checkpoints of conftest.py loaded through the clients' real
  loading code (transformers in float32 on the CPU and bitsandbytes 4-bit;
  MLX, and a 4-bit ``mlx_lm.convert``): end ids, one ``<bos>``, thinking on
  and off in the prompt, tool calls under the grammar (every call parses,
  names a real tool and validates against its schema), the ``role: "tool"``
  round trip, JSON output;
* cross-backend parity: greedy tokens, prompt ids and counts identical on
  transformers (float32) and MLX for every tiny Gemma 4 and Gemma 3n.

Clients are session-scoped (one per backend and checkpoint) and requests
are short (a few tokens, or logit biases that close strings at once).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from conftest import BACKENDS, make_client
from test_core_support import Gemma4ScriptedClient

from core.families.gemma4_syntax import CONTROL_TOKENS, format_call
from core.stream import fold_deltas

#: arch -> conftest fixture of its tiny checkpoint.
CHECKPOINTS = {
    "gemma4_text": "gemma4_path",
    "gemma4_moe": "gemma4_moe_path",
    "gemma4": "gemma4_vision_path",
    "gemma4_unified": "gemma4_unified_path",
    "gemma3n": "gemma3n_path",
}
GEMMA4 = ("gemma4_text", "gemma4_moe", "gemma4", "gemma4_unified")
#: Gemma 4's end ids (generation config): <eos>, <turn|>, <|tool_response>.
EOS, TURN_END, TOOL_RESPONSE = 1, 106, 50
BOS, THINK, CHANNEL_START, CHANNEL_END, STRING_DELIM, CALL_START = 2, 98, 100, 101, 52, 48
#: Gemma 3n's end ids: <eos>, <end_of_turn>.
GEMMA3N_ENDS = (1, 106)
#: No end id can win: the reply runs to max_tokens.
NO_END = {EOS: -100.0, TURN_END: -100.0, TOOL_RESPONSE: -100.0}
#: Strings close as soon as they open (short calls from a random model).
SHORT_STRINGS = {STRING_DELIM: 4.0}

USER = [{"role": "user", "content": "What is the weather in Paris? Book a table too."}]
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
}
BOOKING = {
    "type": "object",
    "properties": {
        "guests": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 8},
                    "vip": {"type": "boolean"},
                },
                "required": ["name", "vip"],
            },
            "minItems": 1,
            "maxItems": 2,
        },
        "price": {"type": "number", "minimum": 0, "maximum": 1000},
        "where": {
            "type": "object",
            "properties": {
                "floor": {"type": "string", "enum": ["low", "high"]},
                "room": {"type": "integer"},
            },
            "required": ["floor"],
        },
    },
    "required": ["guests", "where"],
}
SCHEMAS = {
    "get_weather": WEATHER,
    "book_table": BOOKING,
    "ping": {"type": "object", "properties": {}},
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": name, "description": f"{name}.", "parameters": schema},
    }
    for name, schema in SCHEMAS.items()
]


def valid_calls(message: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``message``'s tool calls as ``(name, arguments)``; each names a real tool and its
    arguments validate against that tool's schema."""
    out = []
    for call in message.get("tool_calls") or []:
        assert call["type"] == "function" and call["id"].startswith("call_")
        name = call["function"]["name"]
        assert name in SCHEMAS, name
        arguments = json.loads(call["function"]["arguments"])
        jsonschema.validate(arguments, SCHEMAS[name])
        out.append((name, arguments))
    return out


def no_control_tokens(text: str | None) -> bool:
    return not any(token in (text or "") for token in CONTROL_TOKENS)


# --------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def clients(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """``clients(backend, arch, **options)``: one shared client per backend, checkpoint
    and options, closed at the end of the session."""
    made: dict[tuple[Any, ...], Any] = {}

    def get(backend: str, arch: str, **options: Any) -> Any:
        key = (backend, arch, tuple(sorted(options.items())))
        if key not in made:
            path = request.getfixturevalue(CHECKPOINTS[arch])
            made[key] = make_client(backend, path, **options)
        return made[key]

    yield get
    for client in made.values():
        client.close()


@pytest.fixture(params=BACKENDS)
def g4(request: pytest.FixtureRequest, clients: Callable[..., Any]) -> Any:
    """The dense tiny Gemma 4 (``gemma4_text``) client of each backend."""
    return clients(request.param, "gemma4_text")


@pytest.fixture(scope="session")
def scripted_client(gemma4_path: Path) -> Iterator[Gemma4ScriptedClient]:
    client = Gemma4ScriptedClient(gemma4_path)
    yield client
    client.close()


@pytest.fixture
def scripted(scripted_client: Gemma4ScriptedClient) -> Gemma4ScriptedClient:
    """The shared scripted client, its script empty (a failed test leaves none behind)."""
    scripted_client.script.clear()
    return scripted_client


# ------------------------------------------------------------- scripted: thinking

THOUGHT = "Paris is in France; 20 degrees."
ANSWER = "It is 20 degrees in Paris."


def thought_then_answer(client: Gemma4ScriptedClient) -> list[int]:
    return client.ids("<|channel>", "thought\n", THOUGHT, "<channel|>", ANSWER, "<turn|>")


def test_scripted_client_is_gemma4(scripted) -> None:
    assert scripted.family.name == "gemma4"
    info = scripted.get_model_info()
    assert (info["family"], info["model_type"]) == ("gemma4", "gemma4_text")


def test_create_splits_reasoning_from_content(scripted) -> None:
    script = thought_then_answer(scripted)
    scripted.enqueue(script)
    out = scripted.create(USER, max_tokens=200, thinking=True)
    [choice] = out["choices"]
    assert choice["message"] == {
        "role": "assistant",
        "content": ANSWER,
        "reasoning_content": THOUGHT,
    }
    assert choice["finish_reason"] == "stop"
    thinking = script.index(CHANNEL_END) + 1  # <|channel> .. <channel|>, markers included
    assert out["usage"] == {
        "prompt_tokens": len(scripted.history[-1][0][0].ids),
        "completion_tokens": len(script),
        "total_tokens": len(scripted.history[-1][0][0].ids) + len(script),
        "completion_tokens_details": {"reasoning_tokens": thinking},
    }
    assert "<|think|>" in scripted.history[-1][0][0].text


def test_stream_sends_reasoning_strictly_before_content(scripted) -> None:
    script = thought_then_answer(scripted)
    scripted.enqueue(script)
    chunks = list(scripted.create(USER, max_tokens=200, thinking=True, stream=True))
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    kinds = [
        "r" if "reasoning_content" in d else "c"
        for d in deltas
        if d.get("reasoning_content") or d.get("content")
    ]
    assert kinds == sorted(kinds, reverse=True) and "r" in kinds and "c" in kinds  # r... then c...
    assert "".join(d.get("reasoning_content", "") for d in deltas) == THOUGHT
    assert "".join(d.get("content") or "" for d in deltas) == ANSWER
    assert all(no_control_tokens(d.get("content")) for d in deltas)
    assert all(no_control_tokens(d.get("reasoning_content")) for d in deltas)
    assert chunks[-1]["usage"]["completion_tokens"] == len(script)
    assert chunks[-1]["usage"]["completion_tokens_details"] == {
        "reasoning_tokens": script.index(CHANNEL_END) + 1
    }
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "stop" and finishes.count("stop") == 1


def test_fold_equals_the_stream(scripted) -> None:
    from core import SamplingParams

    script = thought_then_answer(scripted)
    scripted.enqueue(script)
    params = SamplingParams.build(max_tokens=200, thinking=True)
    deltas = list(scripted.stream_deltas([USER], params))
    folded = fold_deltas(deltas)
    assert (folded.reasoning, folded.text, folded.finish_reason) == (THOUGHT, ANSWER, "stop")
    assert folded.completion_tokens == len(script)
    assert folded.reasoning_tokens == script.index(CHANNEL_END) + 1
    # reasoning_tokens only grows, and every reasoning delta comes before the first text delta
    counts = [d.reasoning_tokens for d in deltas]
    assert counts == sorted(counts)
    first_text = next(i for i, d in enumerate(deltas) if d.text)
    assert all(not d.reasoning for d in deltas[first_text:])


@pytest.mark.parametrize("how", ["byte-tokens", "label-one-char-per-token"])
def test_split_is_exact_however_the_text_is_cut(scripted, how) -> None:
    """Byte-fallback characters right against the control ids, and the ``thought``
    label cut into single characters."""
    thought, answer = "think 日本", "日本 ok"  # no token for 日 / 本: byte-fallback
    if how == "byte-tokens":
        script = scripted.ids("<|channel>", "thought\n", thought, "<channel|>", answer, "<turn|>")
        # 4 characters of 3 bytes each, as byte-fallback tokens
        assert sum(t in scripted._byte_ids for t in script) == 12
    else:
        script = (
            scripted.ids("<|channel>")
            + scripted.spelled("thought\n")
            + scripted.ids(thought, "<channel|>", answer, "<turn|>")
        )
    scripted.enqueue(script)
    out = scripted.create(USER, max_tokens=200, thinking=True)
    message = out["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == (thought, answer)
    scripted.enqueue(script)
    chunks = list(scripted.create(USER, max_tokens=200, thinking=True, stream=True))
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == thought
    assert "".join(d.get("content") or "" for d in deltas) == answer
    last_reasoning = max(i for i, d in enumerate(deltas) if d.get("reasoning_content"))
    first_content = min(i for i, d in enumerate(deltas) if d.get("content"))
    assert last_reasoning < first_content


#: Replies that spell control tokens with ordinary tokens (one per character): text.
SPELLED = [
    "BERT replaces a word with <mask> and predicts it.",
    "Gemma ends a turn with <turn|> then stops.",
    '{"a": "x<|channel>y"}',
    "A thought ends with <channel|> and the answer follows.",
    "Calls start with <|tool_call>call:f{} and end with <tool_call|> there.",
    'Strings sit between <|"|> marks, and <eos> ends it all.',
]


@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("text", SPELLED)
def test_spelled_control_tokens_are_content(scripted, text, thinking) -> None:
    """Control tokens are read by id: their spelling in ordinary tokens is plain content
    (no grammar is active here to keep the model from writing it)."""
    script = scripted.spelled(text) + scripted.ids("<turn|>")
    scripted.enqueue(script)
    out = scripted.create(USER, max_tokens=200, thinking=thinking)
    choice = out["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": text}
    assert choice["finish_reason"] == "stop"
    assert out["usage"].get("completion_tokens_details", {}).get("reasoning_tokens", 0) == 0
    scripted.enqueue(script)
    chunks = list(scripted.create(USER, max_tokens=200, thinking=thinking, stream=True))
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == text
    assert not any(d.get("reasoning_content") or d.get("tool_calls") for d in deltas)


def test_spelled_markers_inside_a_real_thought_and_call(scripted) -> None:
    """Real control ids still split reasoning / content / calls exactly while the text
    around them spells markers (in the thought, the answer and a call's string)."""
    thought = "Maybe <channel|> or <|tool_call> here"
    answer = "Done <|channel>thought\nnot a thought"
    script = (
        scripted.ids("<|channel>", "thought\n")
        + scripted.spelled(thought)
        + scripted.ids("<channel|>")
        + scripted.spelled(answer)
        + scripted.ids("<turn|>")
    )
    scripted.enqueue(script)
    out = scripted.create(USER, max_tokens=400, thinking=True)
    message = out["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == (thought, answer)
    assert out["usage"]["completion_tokens_details"] == {
        "reasoning_tokens": script.index(CHANNEL_END) + 1
    }
    # a call whose string argument spells <|"|> and <tool_call|>: the string holds them
    note = 'a <|"|> b <tool_call|> c'
    call = (
        scripted.ids("<|tool_call>", "call:note{text:", '<|"|>')
        + scripted.spelled(note)
        + scripted.ids('<|"|>', "}", "<tool_call|>", "<turn|>")
    )
    scripted.enqueue(call)
    out = scripted.create(USER, max_tokens=400, tools=[NOTE], tool_choice="required")
    [got] = out["choices"][0]["message"]["tool_calls"]
    assert json.loads(got["function"]["arguments"]) == {"text": note}
    assert out["choices"][0]["finish_reason"] == "tool_calls"


def test_special_ids_that_are_not_markers_are_dropped(scripted) -> None:
    """``<pad>``, ``<mask>``, media tokens and a stray ``<|"|>`` produced as ids are not
    text (as ``skip_special_tokens`` drops them), byte tokens keep their characters
    across them, and a noncharacter that byte tokens spell cannot pose as a marker."""
    tok = scripted.tokenizer
    byte = {b: int(tok.convert_tokens_to_ids(f"<0x{b:02X}>")) for b in (0xE6, 0x97, 0xA5)}
    script = [
        *scripted.ids("a", "<pad>", "b", "<mask>", "c", "<|image|>", '<|"|>', "d", " "),
        *(byte[0xE6], scripted.ids("<mask>")[0], byte[0x97], byte[0xA5]),  # 日, split by <mask>
        *scripted.ids("<turn|>"),
    ]
    scripted.enqueue(script)
    assert scripted.create(USER, max_tokens=50)["choices"][0]["message"]["content"] == "abcd 日"
    # U+FDD0 (the <|tool_call> sentinel's range) spelled by byte tokens: U+FFFD, not a call
    fdd0 = [int(tok.convert_tokens_to_ids(f"<0x{b:02X}>")) for b in (0xEF, 0xB7, 0x90)]
    scripted.enqueue(scripted.ids("x") + fdd0 + scripted.ids("y", "<turn|>"))
    out = scripted.create(USER, max_tokens=50, tools=[NOTE], tool_choice="auto")
    assert out["choices"][0]["message"]["content"] == "x\ufffdy"
    assert out["choices"][0]["finish_reason"] == "stop"


def test_cut_off_warning_only_for_constrained_rows(scripted, caplog) -> None:
    """An unconstrained reply that writes <|tool_call> and runs out of tokens was never
    promised a call: no "constrained ... cut off" warning; a constrained one warns."""
    script = scripted.ids("<|tool_call>", "call:note{text:", '<|"|>', "long text here")
    with caplog.at_level("WARNING", logger="gemma_local"):
        scripted.enqueue(script)
        out = scripted.create(USER, max_tokens=4)
        assert out["choices"][0]["finish_reason"] == "length"
        assert "cut off" not in caplog.text
        scripted.enqueue(script)
        out = scripted.create(USER, max_tokens=4, tools=[NOTE], tool_choice="required")
        assert out["choices"][0]["finish_reason"] == "length"
        assert "a constrained tool call was cut off" in caplog.text


def test_max_tokens_counts_thinking(scripted) -> None:
    script = thought_then_answer(scripted)
    scripted.enqueue(script)
    pushed = scripted.pushed
    out = scripted.create(USER, max_tokens=6, thinking=True)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] == ""  # cut off while thinking: no answer
    assert out["usage"]["completion_tokens"] == 6
    assert out["usage"]["completion_tokens_details"] == {"reasoning_tokens": 6}
    assert scripted.pushed - pushed == 6  # the backend was stopped at the limit


def test_thinking_is_off_by_default_and_reasoning_effort_turns_it_on(scripted) -> None:
    prompt = scripted.format_prompt(USER)
    assert "<|think|>" not in prompt.text and THINK not in prompt.ids
    assert prompt.ids[0] == BOS and list(prompt.ids).count(BOS) == 1
    for options, on in (
        ({"thinking": True}, True),
        ({"thinking": False}, False),
        ({"reasoning_effort": "low"}, True),
        ({"reasoning_effort": "none"}, False),
    ):
        assert ("<|think|>" in scripted.format_prompt(USER, **options).text) is on, options


def test_thinking_before_a_scripted_call(scripted) -> None:
    tools = [TOOLS[0]]
    arguments = {"city": "Paris", "unit": "celsius"}
    script = scripted.ids(
        "<|channel>",
        "thought\n",
        THOUGHT,
        "<channel|>",
        *_call_parts("get_weather", arguments),
        "<turn|>",
    )
    scripted.enqueue(script)
    out = scripted.create(USER, max_tokens=200, thinking=True, tools=tools)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["reasoning_content"] == THOUGHT
    assert choice["message"]["content"] is None
    assert valid_calls(choice["message"]) == [("get_weather", arguments)]
    scripted.enqueue(script)
    chunks = list(scripted.create(USER, max_tokens=200, thinking=True, tools=tools, stream=True))
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    order = [k for d in deltas for k in ("reasoning_content", "content", "tool_calls") if d.get(k)]
    assert order[-1] == "tool_calls" and set(order) == {"reasoning_content", "tool_calls"}
    [call] = next(d["tool_calls"] for d in deltas if d.get("tool_calls"))
    assert call["index"] == 0 and json.loads(call["function"]["arguments"]) == arguments
    # stop strings end the answer text only: they never cut the thought or a call
    scripted.enqueue(script)
    stopped = scripted.create(USER, thinking=True, tools=tools, stop=[",", ":", "\n"])
    assert stopped["choices"][0]["message"]["reasoning_content"] == THOUGHT
    assert valid_calls(stopped["choices"][0]["message"]) == [("get_weather", arguments)]
    # Round trip: the thought before the call is shown again with it, as the template says.
    message = choice["message"]
    history = [
        *USER,
        message,
        {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "20 C"},
    ]
    text = scripted.format_prompt(history, tools=tools, thinking=True).text
    Q = '<|"|>'
    assert text.endswith(
        f"<|turn>model\n<|channel>thought\n{THOUGHT}\n<channel|>"
        f"{format_call('get_weather', arguments)}"
        f"<|tool_response>response:get_weather{{value:{Q}20 C{Q}}}<tool_response|>"
    )


@pytest.mark.parametrize(
    ("stop", "reasoning", "content"),
    [
        # a newline in the thought label or the thought does not end the reply
        (["\n"], "line one\nline two", "Answer one."),
        (["two"], "line one\nline two", "Answer one.\nAnswer "),
        # text inside control tokens is not text the model wrote
        (["channel"], "line one\nline two", "Answer one.\nAnswer two."),
        (["|"], "line one\nline two", "Answer one.\nAnswer two."),
        (["one.\nAns"], "line one\nline two", "Answer "),  # across tokens
    ],
)
def test_stop_strings_match_the_answer_only(scripted, stop, reasoning, content) -> None:
    script = scripted.ids(
        "<|channel>", "thought\n", "line one\nline two", "<channel|>",
        "Answer one.\nAnswer two.", "<turn|>",
    )  # fmt: skip
    scripted.enqueue(script)
    out = scripted.create(USER, max_tokens=200, thinking=True, stop=stop)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"] == {
        "role": "assistant",
        "content": content,
        "reasoning_content": reasoning,
    }
    scripted.enqueue(script)
    chunks = list(scripted.create(USER, max_tokens=200, thinking=True, stop=stop, stream=True))
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == content
    assert "".join(d.get("reasoning_content", "") for d in deltas) == reasoning
    assert chunks[-1]["usage"]["completion_tokens"] == out["usage"]["completion_tokens"]


def test_stop_string_never_splits_a_control_token(scripted) -> None:
    scripted.enqueue(scripted.ids("Hello ", '<|"|>', "there", "<turn|>"))
    out = scripted.create(USER, max_tokens=20, stop=["|", "<"])
    assert out["choices"][0]["message"]["content"] == "Hello there"


def _call_parts(name: str, arguments: dict[str, Any]) -> list[str]:
    """The canonical call text cut at its control tokens, for :meth:`Gemma4ScriptedClient.ids`."""
    text = format_call(name, arguments)
    parts: list[str] = []
    while text:
        marker = next((m for m in CONTROL_TOKENS if text.startswith(m)), None)
        if marker is not None:
            parts.append(marker)
            text = text[len(marker) :]
            continue
        nxt = min((i for i in (text.find(m) for m in CONTROL_TOKENS) if i > 0), default=len(text))
        parts.append(text[:nxt])
        text = text[nxt:]
    return parts


def _note_tool(name: str, **bounds: int) -> dict[str, Any]:
    text = {"type": "string", **bounds}
    schema = {"type": "object", "properties": {"text": text}, "required": ["text"]}
    return {"type": "function", "function": {"name": name, "parameters": schema}}


NOTE, NOTE_BOUNDED = _note_tool("note"), _note_tool("short_note", maxLength=40)


@pytest.mark.parametrize(
    ("where", "options"),
    [
        ("thought", {"tools": [TOOLS[2]], "tool_choice": "required", "thinking": True}),
        ("prose", {"tools": [TOOLS[2]], "tool_choice": "auto"}),
        ("string", {"tools": [NOTE], "tool_choice": "required"}),
        ("string", {"tools": [NOTE_BOUNDED], "tool_choice": "required"}),
        ("thought", {"response_format": {"type": "json_object"}, "thinking": True}),
    ],
)
def test_grammar_keeps_control_token_text_out_of_free_text(scripted, where, options) -> None:
    """The grammar does not let the model spell a control token (``<`` ``channel`` ``|>``)
    in a thought, prose or a string: the parser reads control tokens by id, but the reply
    rendered back into a prompt is text, where a spelled ``<|"|>`` would end a string
    early. Plain ``<`` and ``|`` stay allowed."""
    import llguidance
    from llguidance.hf import from_tokenizer

    from core import SamplingParams

    tok = scripted.load().tokenizer
    params = SamplingParams.build(**options)
    grammar = scripted.family.grammar(params, params.thinking)
    assert grammar is not None
    ll = from_tokenizer(tok, n_vocab=len(tok), eos_token=[TURN_END, EOS, TOOL_RESPONSE])
    compiled = llguidance.LLMatcher(ll, llguidance.LLMatcher.grammar_from_lark(grammar))

    def reply(text: str) -> list[int]:
        ids = scripted.spelled(text)
        if where == "thought":
            head = scripted.ids("<|channel>", "thought\n")
            if "response_format" in options:
                return head + ids + scripted.ids("<channel|>", "{}")
            return head + ids + scripted.ids("<channel|>", *_call_parts("ping", {}))
        if where == "prose":
            return ids
        name = options["tools"][0]["function"]["name"]
        pre = scripted.ids(f'<|tool_call>call:{name}{{text:<|"|>')
        return pre + ids + scripted.ids('<|"|>}<tool_call|>')

    def accepts(ids: list[int]) -> bool:
        matcher = compiled.deep_copy()
        return all(matcher.consume_token(t) for t in ids) and matcher.is_accepting()

    assert accepts(reply("a < b | c"))
    for spelled in ("<channel|>", "<|tool_call>", '<|"|>', "<turn|>", "<eos>", "<mask>"):
        assert not accepts(reply(f"a{spelled}b")), spelled


# ------------------------------------------------------------------------ loading


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", list(CHECKPOINTS))
def test_every_checkpoint_loads_and_generates(clients, backend, arch) -> None:
    client = clients(backend, arch)
    out = client.create(USER, temperature=0, max_tokens=3, logit_bias=NO_END)
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 3
    prompt = client.format_prompt(USER)
    assert prompt.ids[0] == BOS and list(prompt.ids).count(BOS) == 1  # one <bos>
    info = client.get_model_info()
    family = "gemma3" if arch == "gemma3n" else "gemma4"
    assert info["family"] == family and info["loaded"]
    if backend == "transformers":
        expected = {
            "gemma4_text": ("gemma4_text", "Gemma4ForCausalLM"),
            "gemma4_moe": ("gemma4_text", "Gemma4ForCausalLM"),
            "gemma4": ("gemma4", "Gemma4ForConditionalGeneration"),
            "gemma4_unified": ("gemma4_unified", "Gemma4UnifiedForConditionalGeneration"),
            # the text model of the multimodal checkpoint (AutoModelForCausalLM's
            # Gemma3nForConditionalGeneration needs timm for its vision tower)
            "gemma3n": ("gemma3n_text", "Gemma3nForCausalLM"),
        }[arch]
        assert (info["model_type"], info["architecture"]) == expected
        assert info["dtype"] == "float32"
    else:
        assert info["model_type"] == ("gemma4_text" if arch == "gemma4_moe" else arch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_info_before_load(gemma4_path, gemma3n_path, backend) -> None:
    for path, family, model_type in (
        (gemma4_path, "gemma4", "gemma4_text"),
        (gemma3n_path, "gemma3", "gemma3n"),
    ):
        client = make_client(backend, path)
        info = client.get_model_info()
        assert (info["family"], info["model_type"], info["loaded"]) == (family, model_type, False)
        assert not client.is_loaded


@pytest.mark.parametrize("arch", GEMMA4)
def test_bitsandbytes_4bit(clients, arch) -> None:
    client = clients("transformers", arch, use_4bit_quantization=True)
    out = client.create(USER, temperature=0, max_tokens=3, logit_bias=NO_END)
    assert out["usage"]["completion_tokens"] == 3
    info = client.get_model_info()
    assert info["quantization"].startswith("bitsandbytes nf4") and info["family"] == "gemma4"
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in client.model.modules())


@pytest.fixture(scope="session")
def mlx_4bit_gemma4(tiny_dir: Path, gemma4_path: Path) -> Iterator[Any]:
    from mlx_lm import convert

    out = tiny_dir / "gemma4_text-mlx-4bit"
    if not out.exists():
        convert(str(gemma4_path), str(out), quantize=True, q_bits=4, q_group_size=64)
    client = make_client("mlx", out)
    yield client
    client.close()


def test_mlx_4bit_conversion(mlx_4bit_gemma4) -> None:
    client = mlx_4bit_gemma4
    out = client.create(USER, temperature=0, max_tokens=3, logit_bias=NO_END)
    assert out["usage"]["completion_tokens"] == 3
    info = client.get_model_info()
    assert info["quantization"] == "mlx 4-bit (group size 64)"
    assert (info["family"], info["model_type"]) == ("gemma4", "gemma4_text")
    calls = client.create(
        USER,
        temperature=0,
        max_tokens=64,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        logit_bias=SHORT_STRINGS,
    )
    assert [n for n, _ in valid_calls(calls["choices"][0]["message"])] == ["get_weather"]


# ---------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("end", [EOS, TURN_END, TOOL_RESPONSE])
def test_every_end_id_stops(g4, end) -> None:
    out = g4.create(USER, temperature=0, max_tokens=8, logit_bias={end: 100.0})
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["choices"][0]["message"]["content"] == ""
    assert out["usage"]["completion_tokens"] == 1


def test_one_bos_and_thinking_off_by_default(g4) -> None:
    prompt = g4.format_prompt(USER)
    assert prompt.ids[0] == BOS and list(prompt.ids).count(BOS) == 1
    assert prompt.text.startswith("<bos><|turn>user\n")
    assert "<|think|>" not in prompt.text and THINK not in prompt.ids
    on = g4.format_prompt(USER, thinking=True)
    assert "<|think|>" in on.text and THINK in on.ids
    assert list(on.ids).count(BOS) == 1
    if g4.implementation == "mlx":
        # mlx-lm's own wrapper would render thinking on unless told: the client pins it.
        wrapped = g4._wrapper.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
        assert "<|think|>" in wrapped


def test_generate_response_hook_returns_the_answer_text(g4) -> None:
    """The original design's ``_generate_response`` on a built-in backend: no control token."""
    prompt = g4.format_prompt(USER, thinking=True)
    for favoured in (CHANNEL_START, STRING_DELIM, CALL_START):
        text = g4._worker.call(
            lambda f=favoured: g4._generate_response(prompt.text, 0.0, 6, 1.0, logit_bias={f: 30})
        )
        assert text == ""  # six control tokens: nothing of them is text


def test_thinking_on_gemma3_is_refused_before_any_load(
    gemma3_path, gemma3n_path, gemma2_path
) -> None:
    for path, family in (
        (gemma3_path, "gemma3"),
        (gemma3n_path, "gemma3"),
        (gemma2_path, "gemma2"),
    ):
        for backend in BACKENDS:
            client = make_client(backend, path)
            cannot = f"thinking=True needs a model that can think; {family} models cannot"
            with pytest.raises(ValueError, match=cannot):
                client.create(USER, max_tokens=2, thinking=True)
            with pytest.raises(ValueError, match=cannot):
                client.create(USER, max_tokens=2, reasoning_effort="high")
            with pytest.raises(ValueError, match=cannot):
                client.format_prompt(USER, thinking=True)
            assert not client.is_loaded


@pytest.mark.parametrize("backend", BACKENDS)
def test_gemma3n_tools_and_json(clients, backend) -> None:
    """Gemma 3n is the Gemma 3 family: JSON calls and JSON output under its grammar."""
    client = clients(backend, "gemma3n")
    out = client.create(
        USER,
        temperature=0,
        max_tokens=40,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "ping"}},
    )
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    assert valid_calls(out["choices"][0]["message"]) == [("ping", {})]
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    out = client.create(
        USER,
        temperature=0,
        max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    assert out["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(out["choices"][0]["message"]["content"]), schema)


TOOL_CHOICES = {
    "required": ("required", True),
    "required-single": ("required", False),
    "named": ({"type": "function", "function": {"name": "get_weather"}}, True),
    "auto": ("auto", True),
    "auto-call": ("auto", False),  # <|tool_call> favoured: the model calls, once
    "none": ("none", True),
}


@pytest.mark.parametrize("choice", list(TOOL_CHOICES))
def test_tool_calls_under_the_grammar(g4, choice) -> None:
    tool_choice, parallel = TOOL_CHOICES[choice]
    bias = {**SHORT_STRINGS, CALL_START: 6.0} if choice == "auto-call" else SHORT_STRINGS
    out = g4.create(
        USER,
        temperature=0,
        max_tokens=128,
        tools=TOOLS,
        tool_choice=tool_choice,
        parallel_tool_calls=parallel,
        logit_bias=bias,
    )
    [reply] = out["choices"]
    message = reply["message"]
    calls = valid_calls(message)
    assert no_control_tokens(message["content"])
    if choice in ("required", "required-single", "named", "auto-call"):
        assert reply["finish_reason"] == "tool_calls" and calls
        assert message["content"] is None
    if choice in ("required-single", "named", "auto-call"):
        assert len(calls) == 1
    if choice == "named":
        assert calls[0][0] == "get_weather"
    if choice == "none":
        assert not calls and "tool_calls" not in message
        assert "<|tool>" not in g4.format_prompt(USER, tools=TOOLS, tool_choice="none").text
    if choice == "auto":
        assert reply["finish_reason"] in ("stop", "tool_calls", "length")
        assert (reply["finish_reason"] == "tool_calls") == bool(calls)


@pytest.mark.parametrize("parallel", [True, False])
def test_parallel_tool_calls(g4, parallel) -> None:
    """With <|tool_call> favoured, parallel calls follow each other until max_tokens; without
    parallel calls the grammar ends the reply after the first."""
    out = g4.create(
        USER,
        temperature=0,
        max_tokens=40,
        tools=[TOOLS[2]],
        tool_choice="required",
        parallel_tool_calls=parallel,
        logit_bias={CALL_START: 6.0},
    )
    reply = out["choices"][0]
    calls = valid_calls(reply["message"])
    assert calls and all(call == ("ping", {}) for call in calls)
    ids = [c["id"] for c in reply["message"]["tool_calls"]]
    assert len(set(ids)) == len(ids)
    if parallel:
        assert len(calls) >= 2 and reply["finish_reason"] == "length"
    else:
        assert len(calls) == 1 and reply["finish_reason"] == "tool_calls"
        assert out["usage"]["completion_tokens"] < 40


def test_streamed_tool_calls_equal_the_completion(g4) -> None:
    options = dict(
        temperature=0, max_tokens=128, tools=TOOLS, tool_choice="required", logit_bias=SHORT_STRINGS
    )
    whole = g4.create(USER, **options)["choices"][0]
    chunks = list(g4.create(USER, stream=True, **options))
    streamed = [
        call
        for c in chunks
        if c["choices"]
        for call in c["choices"][0]["delta"].get("tool_calls", [])
    ]
    assert [c["index"] for c in streamed] == list(range(len(streamed)))
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in streamed] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in whole["message"]["tool_calls"]
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"
    assert all(not c["choices"][0]["delta"].get("content") for c in chunks if c["choices"])


def test_round_trip_renders_the_call_and_the_result(g4) -> None:
    options = dict(temperature=0, max_tokens=128, tools=TOOLS, logit_bias=SHORT_STRINGS)
    reply = g4.create(USER, tool_choice="required", parallel_tool_calls=False, **options)
    message = reply["choices"][0]["message"]
    [(name, arguments)] = valid_calls(message)
    history = [
        *USER,
        message,
        {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": '{"ok": true}'},
    ]
    text = g4.format_prompt(history, tools=TOOLS).text
    assert format_call(name, arguments) in text
    # A string result is the template's {value:...} (a JSON string is not re-parsed).
    result = '<|"|>{"ok": true}<|"|>'
    assert f"<|tool_response>response:{name}{{value:{result}}}<tool_response|>" in text
    following = g4.create(history, **options)  # the model answers the tool result
    assert following["usage"]["prompt_tokens"] > reply["usage"]["prompt_tokens"]
    valid_calls(following["choices"][0]["message"])


def test_thinking_before_a_call(g4) -> None:
    """The grammar lets the model think first; the channel is counted, the call validates."""
    # <|channel> opens the channel at once; a small bias on <channel|> closes it after a
    # few dozen tokens of (random) thought, then the grammar asks for the call.
    options: dict[str, Any] = dict(
        temperature=0,
        max_tokens=96,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "ping"}},
        thinking=True,
        logit_bias={CHANNEL_START: 20.0, CHANNEL_END: 0.2},
    )
    out = g4.create(USER, **options)
    reply = out["choices"][0]
    assert reply["finish_reason"] == "tool_calls"
    assert valid_calls(reply["message"]) == [("ping", {})]
    reasoning = reply["message"]["reasoning_content"]
    assert reasoning and no_control_tokens(reasoning) and reply["message"]["content"] is None
    # the thought, its markers and label included, and then the call's tokens
    label = len(g4.tokenizer.encode("thought\n", add_special_tokens=False))
    thinking = out["usage"]["completion_tokens_details"]["reasoning_tokens"]
    assert label + 2 < thinking < out["usage"]["completion_tokens"]
    chunks = list(g4.create(USER, stream=True, **options))
    order = [
        k
        for c in chunks
        if c["choices"]
        for k in ("reasoning_content", "content", "tool_calls")
        if c["choices"][0]["delta"].get(k)
    ]
    assert order[-1] == "tool_calls" and set(order) == {"reasoning_content", "tool_calls"}


@pytest.mark.parametrize("kind", ["json_object", "json_schema"])
def test_json_output(g4, kind) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    response_format = (
        {"type": "json_object"}
        if kind == "json_object"
        else {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    )
    close = g4.tokenizer.convert_tokens_to_ids("}")
    out = g4.create(
        USER, temperature=0, max_tokens=40, response_format=response_format, logit_bias={close: 5.0}
    )
    reply = out["choices"][0]
    assert reply["finish_reason"] == "stop"
    value = json.loads(reply["message"]["content"])
    assert isinstance(value, dict)
    if kind == "json_schema":
        jsonschema.validate(value, schema)


def test_thinking_then_json_on_a_real_stream(g4) -> None:
    """A real generated stream: a thought (steered open, and closed after a few dozen
    tokens by a small bias), then the JSON answer the grammar asks for."""
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    options: dict[str, Any] = dict(
        temperature=0,
        max_tokens=96,
        thinking=True,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
        logit_bias={CHANNEL_START: 20.0, CHANNEL_END: 0.2},
    )
    out = g4.create(USER, **options)
    reply = out["choices"][0]
    assert reply["finish_reason"] == "stop"
    reasoning, content = reply["message"]["reasoning_content"], reply["message"]["content"]
    assert reasoning and no_control_tokens(reasoning) and no_control_tokens(content)
    jsonschema.validate(json.loads(content), schema)
    usage = out["usage"]
    assert 0 < usage["completion_tokens_details"]["reasoning_tokens"] < usage["completion_tokens"]
    chunks = list(g4.create(USER, stream=True, **options))
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    last_reasoning = max(i for i, d in enumerate(deltas) if d.get("reasoning_content"))
    first_content = min(i for i, d in enumerate(deltas) if d.get("content"))
    assert last_reasoning < first_content
    assert "".join(d.get("reasoning_content", "") for d in deltas) == reasoning
    assert "".join(d.get("content") or "" for d in deltas) == content
    assert chunks[-1]["usage"] == usage


@pytest.mark.parametrize("backend", BACKENDS)
def test_create_gemma_client_on_a_gemma4_folder(gemma4_path, backend) -> None:
    """The issue's "done when": ``create_gemma_client(backend=..., model_name=<a Gemma 4
    folder>)`` thinks and calls tools natively, on each backend, with its defaults."""
    from core import create_gemma_client

    with create_gemma_client(backend=backend, model_name=str(gemma4_path)) as client:
        assert client.implementation == backend and client.family.name == "gemma4"
        out = client.create(
            USER,
            temperature=0,
            max_tokens=96,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            thinking=True,
            logit_bias={CHANNEL_START: 20.0, CHANNEL_END: 0.2, **SHORT_STRINGS},
        )
        reply = out["choices"][0]
        assert reply["finish_reason"] == "tool_calls" and len(valid_calls(reply["message"])) == 1
        assert reply["message"]["reasoning_content"]
        assert out["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0
        assert "<|think|>" in client.format_prompt(USER, thinking=True).text


@pytest.mark.parametrize("backend", BACKENDS)
def test_gemma4_unified_greedy_thinking_and_a_tool_call(clients, backend) -> None:
    """The encoder-free ``gemma4_unified`` (like gemma-4-12B) on both backends: the Gemma 4
    family by its model_type, greedy text, a thought split off, a native tool call."""
    client = clients(backend, "gemma4_unified")
    assert client.family.name == "gemma4"
    options: dict[str, Any] = dict(temperature=0, max_tokens=12, logit_bias=NO_END)
    first, again = (client.create(USER, **options)["choices"][0]["message"] for _ in range(2))
    assert first == again and first["content"] and no_control_tokens(first["content"])
    # A thought (opened by bias; the grammar allows one channel, then asks for the call).
    assert "<|think|>" in client.format_prompt(USER, thinking=True).text
    thought = client.create(
        USER,
        temperature=0,
        max_tokens=96,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "ping"}},
        thinking=True,
        logit_bias={CHANNEL_START: 20.0, CHANNEL_END: 0.2},
    )
    reply = thought["choices"][0]
    assert reply["finish_reason"] == "tool_calls"
    assert valid_calls(reply["message"]) == [("ping", {})]
    reasoning = reply["message"]["reasoning_content"]
    assert reasoning and no_control_tokens(reasoning) and reply["message"]["content"] is None
    usage = thought["usage"]
    assert 0 < usage["completion_tokens_details"]["reasoning_tokens"] < usage["completion_tokens"]
    call = client.create(
        USER,
        temperature=0,
        max_tokens=64,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        logit_bias=SHORT_STRINGS,
    )
    reply = call["choices"][0]
    assert reply["finish_reason"] == "tool_calls"
    assert [name for name, _ in valid_calls(reply["message"])] == ["get_weather"]


# ------------------------------------------------------------------------ parity


@pytest.mark.parametrize("arch", list(CHECKPOINTS))
def test_greedy_parity_across_backends(clients, arch) -> None:
    """Transformers (float32) and MLX read the same prompt ids and write the same tokens."""
    bias = {t: -100.0 for t in (GEMMA3N_ENDS if arch == "gemma3n" else NO_END)}
    conversation = [{"role": "system", "content": "Be brief."}, *USER]
    replies, prompts = [], []
    for backend in BACKENDS:
        client = clients(backend, arch)
        prompts.append(client.format_prompt(conversation).ids)
        replies.append(client.create(conversation, temperature=0, max_tokens=16, logit_bias=bias))
    assert prompts[0] == prompts[1]
    assert replies[0]["choices"][0]["message"] == replies[1]["choices"][0]["message"]
    assert replies[0]["usage"] == replies[1]["usage"]
    assert replies[0]["usage"]["completion_tokens"] == 16
    if arch != "gemma3n":  # and with thinking and tools in the prompt, and a call
        tf, mlx = (
            clients(b, arch).format_prompt(conversation, tools=TOOLS, thinking=True).ids
            for b in BACKENDS
        )
        assert tf == mlx
        calls = [
            clients(b, arch).create(
                conversation,
                temperature=0,
                max_tokens=64,
                tools=TOOLS,
                tool_choice={"type": "function", "function": {"name": "get_weather"}},
                logit_bias=SHORT_STRINGS,
            )
            for b in BACKENDS
        ]
        tf_calls, mlx_calls = (valid_calls(c["choices"][0]["message"]) for c in calls)
        assert tf_calls == mlx_calls and tf_calls
        assert calls[0]["usage"] == calls[1]["usage"]
