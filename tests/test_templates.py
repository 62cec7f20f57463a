"""Conversation templates: byte-exact against the original `llava/conversation.py` formats,
and the checkpoint's Jinja template against transformers' `apply_chat_template`."""

import json

import pytest

from llava_jax.checks.tiny_tokenizer import build_tiny_tokenizer, save_tiny_tokenizer
from llava_jax.data.templates import (
    TEMPLATES,
    ChatTemplate,
    PromptError,
    get_template,
    load_chat_template,
    render,
    render_spans,
    resolve_template,
    to_hf_content,
)

ONE_TURN = [{"role": "user", "content": "<image>\nWhat is this?"}]
TWO_TURNS = [
    *ONE_TURN,
    {"role": "assistant", "content": "A cat."},
    {"role": "user", "content": "Why?"},
]
TRAINING = [*TWO_TURNS, {"role": "assistant", "content": "It purrs."}]

VICUNA = (
    "A chat between a curious {who} and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the {who}'s questions."
)
LLAVA_LLAMA_2_SYS = (
    "<<SYS>>\nYou are a helpful language and vision assistant. You are able to understand the "
    "visual content that the user provides, and assist the user with a variety of tasks using "
    "natural language.\n<</SYS>>\n\n"
)
# Written by hand from Conversation.get_prompt():
# (one user turn + generation prompt, two user turns + generation prompt). The original's
# `plain` cannot write a reply in a prompt (its sep2 is None); we write it as a caption.
EXPECTED = {
    "plain": ("<image>\nWhat is this?\n", "<image>\nWhat is this?\nA cat.\nWhy?\n"),
    "llava_v0": (
        VICUNA.format(who="human") + "###Human: <image>\nWhat is this?###Assistant:",
        VICUNA.format(who="human")
        + "###Human: <image>\nWhat is this?###Assistant: A cat.###Human: Why?###Assistant:",
    ),
    "vicuna_v1": (
        VICUNA.format(who="user") + " USER: <image>\nWhat is this? ASSISTANT:",
        VICUNA.format(who="user")
        + " USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: Why? ASSISTANT:",
    ),
    "llava_v1": (
        VICUNA.format(who="human") + " USER: <image>\nWhat is this? ASSISTANT:",
        VICUNA.format(who="human")
        + " USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: Why? ASSISTANT:",
    ),
    "llava_llama_2": (
        "[INST] " + LLAVA_LLAMA_2_SYS + "<image>\nWhat is this? [/INST]",
        "[INST] " + LLAVA_LLAMA_2_SYS + "<image>\nWhat is this? [/INST] A cat. </s>"
        "<s>[INST] Why? [/INST]",
    ),
    "mistral_instruct": (
        "[INST] <image>\nWhat is this? [/INST]",
        "[INST] <image>\nWhat is this? [/INST] A cat. </s>[INST] Why? [/INST]",
    ),
    "chatml_direct": (
        "<|im_start|>system\nAnswer the questions.<|im_end|>"
        "<|im_start|>user\n<image>\nWhat is this?<|im_end|><|im_start|>assistant\n",
        "<|im_start|>system\nAnswer the questions.<|im_end|>"
        "<|im_start|>user\n<image>\nWhat is this?<|im_end|><|im_start|>assistant\n"
        "A cat.<|im_end|><|im_start|>user\nWhy?<|im_end|><|im_start|>assistant\n",
    ),
    "qwen_1_5": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"
        "A cat.<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n",
    ),
}
# The trained spans of TRAINING (clean masking: reply + end of turn).
TRAINED = {
    "plain": ["A cat.\nIt purrs.\n"],
    "llava_v0": [" A cat.###", " It purrs.###"],
    "vicuna_v1": [" A cat.</s>", " It purrs.</s>"],
    "llava_v1": [" A cat.</s>", " It purrs.</s>"],
    "llava_llama_2": [" A cat. </s>", " It purrs. </s>"],
    "mistral_instruct": [" A cat. </s>", " It purrs. </s>"],
    "chatml_direct": ["A cat.<|im_end|>", "It purrs.<|im_end|>"],
    "qwen_1_5": ["A cat.<|im_end|>", "It purrs.<|im_end|>"],
}

# llava-hf's templates (transformers' convert_llava_weights_to_hf.py and
# convert_llava_onevision_weights_to_hf.py).
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
OV_HF_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A tokenizer-level template over plain-string content that reads special tokens.
STRING_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}"
    "{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_templates_render_the_original_strings(name):
    one_turn, two_turns = EXPECTED[name]
    template = get_template(name)
    assert render(template, ONE_TURN) == one_turn
    assert render(template, TWO_TURNS) == two_turns


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_spans_cover_the_text_and_train_replies_with_their_end_of_turn(name):
    template = get_template(name)
    spans = render_spans(template, TRAINING)
    assert "".join(text for text, _ in spans) == render(template, TRAINING, False)
    assert [text for text, trained in spans if trained] == TRAINED[name]
    assert all(text for text, _ in spans)
    assert all(a[1] != b[1] for a, b in zip(spans, spans[1:], strict=False))  # merged


def test_a_lone_placeholder_moves_to_the_start_of_its_turn():
    vicuna = get_template("vicuna_v1")
    for content in ("What is this? <image>", "  <image>What is this?", "<image>\n\nWhat is this?"):
        assert render(vicuna, [{"role": "user", "content": content}]) == EXPECTED["vicuna_v1"][0]
    inner = render(vicuna, [{"role": "user", "content": "What is <image> this?"}])
    assert inner.endswith(" USER: <image>\nWhat is  this? ASSISTANT:")  # as the original
    only = render(vicuna, [{"role": "user", "content": "<image>"}])
    assert only.endswith(" USER: <image> ASSISTANT:")  # "<image>\n".strip()
    video = render(vicuna, [{"role": "user", "content": "Why? <video>"}])
    assert video.endswith(" USER: <video>\nWhy? ASSISTANT:")
    # Several placeholders are interleaved content: left where they are (LLaVA-NeXT).
    multi = "First <image> then <image>, and <video>."
    assert render(vicuna, [{"role": "user", "content": multi}]).endswith(
        f"USER: {multi} ASSISTANT:"
    )


def test_plain_keeps_only_the_image_of_the_instruction():
    plain = get_template("plain")
    caption = [{"role": "user", "content": "Describe <image> briefly."}]
    caption.append({"role": "assistant", "content": "A cat on a mat."})
    assert render(plain, caption, add_generation_prompt=False) == "<image>A cat on a mat.\n"
    assert render_spans(plain, caption) == [("<image>", False), ("A cat on a mat.\n", True)]


def test_system_message_replaces_the_default():
    system = [{"role": "system", "content": "Be brief."}]
    assert render(get_template("vicuna_v1"), system + ONE_TURN) == (
        "Be brief. USER: <image>\nWhat is this? ASSISTANT:"
    )
    assert render(get_template("mistral_instruct"), system + ONE_TURN) == (
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<image>\nWhat is this? [/INST]"
    )
    assert render(get_template("qwen_1_5"), system + ONE_TURN).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    )


# haotian-liu/LLaVA and LLaVA-VL/LLaVA-NeXT (qwen_1_5) `llava/conversation.py`, run with
# `conv.system = ""`, a user turn "<image>\nHi" and a None reply: styles that write
# `system + sep` keep the separator.
EMPTY_SYSTEM = {
    "plain": "<image>\nHi\n",
    "llava_v0": "###Human: <image>\nHi###Assistant:",
    "vicuna_v1": " USER: <image>\nHi ASSISTANT:",
    "llava_v1": " USER: <image>\nHi ASSISTANT:",
    "llava_llama_2": "[INST] <image>\nHi [/INST]",
    "mistral_instruct": "[INST] <image>\nHi [/INST]",
    "chatml_direct": "<|im_end|><|im_start|>user\n<image>\nHi<|im_end|><|im_start|>assistant\n",
    "qwen_1_5": "<|im_start|>user\n<image>\nHi<|im_end|>\n<|im_start|>assistant\n",
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_an_empty_system_message_keeps_the_original_separator(name):
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": "<image>\nHi"}]
    assert render(get_template(name), messages) == EMPTY_SYSTEM[name]


def test_plain_prompt_keeps_the_question():
    # A question asked of a stage-1 model reaches it (get_prompt), though its training
    # samples reduce the instruction to the image (preprocess_plain).
    plain = get_template("plain")
    assert render(plain, [{"role": "user", "content": "Hi <image>"}]) == "<image>\nHi\n"
    caption = [{"role": "user", "content": "Hi <image>"}, {"role": "assistant", "content": "A"}]
    assert render(plain, caption, add_generation_prompt=False) == "<image>A\n"


def test_template_names_and_stop_strings():
    assert get_template("v1") is get_template("vicuna_v1")
    assert get_template("qwen_2") is get_template("qwen_1_5")
    assert get_template("qwen_1_5").stop_strings == ("<|im_end|>",)
    assert get_template("llava_v0").stop_strings == ("###",)
    with pytest.raises(PromptError, match="unknown template 'vicuna'; choose one of"):
        get_template("vicuna")


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "assistant", "content": "Hi."}], "message 0: assistant where user"),
        ([*ONE_TURN, *ONE_TURN], "message 1: user where assistant"),
        ([*ONE_TURN, {"role": "system", "content": "x"}], "system message may only come first"),
        ([{"role": "gpt", "content": "x"}], "role 'gpt' is not system, user or assistant"),
        (["hello"], "role 0 is not"),
        (
            [{"role": "user", "content": [{"type": "image"}]}],
            "content must be a string with placeholders",
        ),
    ],
)
def test_malformed_conversations_are_refused(messages, match):
    with pytest.raises(PromptError, match=match):
        render(get_template("vicuna_v1"), messages)


def test_hf_content_parts():
    assert to_hf_content("<image>\nWhat is <video> this? ") == [
        {"type": "image"},
        {"type": "text", "text": "What is"},
        {"type": "video"},
        {"type": "text", "text": "this?"},
    ]


def _hf_messages(messages):
    return [{**m, "content": to_hf_content(m["content"])} for m in messages]


@pytest.mark.parametrize("text", [LLAVA_HF_TEMPLATE, OV_HF_TEMPLATE])
@pytest.mark.parametrize("generation", [True, False])
def test_chat_template_renders_what_transformers_renders(text, generation):
    tokenizer = build_tiny_tokenizer()
    template = ChatTemplate(text, special_tokens=tuple(tokenizer.special_tokens_map.items()))
    assert template.content_parts
    video = [{"role": "user", "content": "<image> and <video>: same cat?"}]
    system = [{"role": "system", "content": "Be brief."}]
    for messages in (ONE_TURN, TWO_TURNS, video, system + TRAINING):
        want = tokenizer.apply_chat_template(
            _hf_messages(messages), chat_template=text, tokenize=False,
            add_generation_prompt=generation,
        )  # fmt: skip
        assert render(template, messages, generation) == want
        assert render(template, _hf_messages(messages), generation) == want  # HF format as is


def test_chat_template_spans_follow_its_generation_blocks():
    spans = render_spans(ChatTemplate(OV_HF_TEMPLATE), TRAINING)
    assert [text for text, trained in spans if trained] == ["A cat.", "It purrs."]
    assert "".join(t for t, _ in spans) == render(ChatTemplate(OV_HF_TEMPLATE), TRAINING, False)
    with pytest.raises(PromptError, match="no {% generation %} blocks"):
        render_spans(ChatTemplate(STRING_TEMPLATE, source="x.jinja"), TRAINING)


def test_chat_template_failures_are_prompt_errors():
    template = ChatTemplate("{{ raise_exception('no images here') }}", source="t.jinja")
    with pytest.raises(PromptError, match="t.jinja: chat template failed: no images here"):
        render(template, ONE_TURN)


def test_load_chat_template_where_transformers_looks(tmp_path):
    hf_dir = save_tiny_tokenizer(tmp_path / "hf", chat_template=STRING_TEMPLATE)
    template = load_chat_template(hf_dir)
    assert template.text == STRING_TEMPLATE and not template.content_parts
    tokenizer = build_tiny_tokenizer()
    want = tokenizer.apply_chat_template(TWO_TURNS, chat_template=STRING_TEMPLATE, tokenize=False)
    assert render(template, TWO_TURNS, add_generation_prompt=False) == want
    assert want.startswith("<s>[INST] <image>\nWhat is this? [/INST] A cat.</s>")

    # A llava-jax model dir: the template is found in assets/; chat_template.json wins over
    # chat_template.jinja, as in transformers' processors.
    assets = tmp_path / "model" / "assets"
    assets.mkdir(parents=True)
    (assets / "chat_template.jinja").write_text(STRING_TEMPLATE)
    (assets / "chat_template.json").write_text(json.dumps({"chat_template": OV_HF_TEMPLATE}))
    assert load_chat_template(tmp_path / "model").text == OV_HF_TEMPLATE
    assert resolve_template(None, tmp_path / "model").text == OV_HF_TEMPLATE
    assert resolve_template("qwen_2", tmp_path / "model") is TEMPLATES["qwen_1_5"]

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    config = {"bos_token": {"content": "<s>"}, "chat_template": STRING_TEMPLATE}
    (legacy / "tokenizer_config.json").write_text(json.dumps(config))
    assert dict(load_chat_template(legacy).special_tokens) == {"bos_token": "<s>"}


def test_no_chat_template_asks_for_a_name(tmp_path):
    hf_dir = save_tiny_tokenizer(tmp_path)
    assert load_chat_template(hf_dir) is None
    with pytest.raises(PromptError, match="no chat template .* pass a template name, one of"):
        resolve_template(None, hf_dir)
