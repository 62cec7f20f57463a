"""`llava-jax generate` end to end against transformers' processor + `generate`.

The checkpoint is a tiny random HF LLaVA directory with a tiny tokenizer and a PIL image
processor config, exactly what a user has after downloading; the CLI converts it on the fly,
preprocesses the image, tokenizes, generates, and must print the tokens transformers gives.
"""

from __future__ import annotations

import json
import subprocess
import sys

import hf_tiny
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaProcessor
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from llava_jax.checks.tiny_tokenizer import build_tiny_tokenizer

PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    model = hf_tiny.llava()
    path = hf_tiny.save_llava_dir(tmp_path_factory.mktemp("hf"), model)
    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (60, 90, 3), np.uint8))
    image.save(path / "photo.png")
    return path, model


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "llava_jax.cli.main", *map(str, args)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_generate_json_matches_transformers(hf_dir):
    path, model = hf_dir
    proc = cli("generate", "--model", path, "--image", path / "photo.png", "--prompt", PROMPT,
               "--raw", "--max-new-tokens", 8, "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"text", "token_ids", "prompt_tokens", "image_tokens",
                        "time_to_first_token_s", "decode_tokens_per_s"}  # fmt: skip

    processor = LlavaProcessor(
        image_processor=LlavaImageProcessorPil.from_pretrained(path),
        tokenizer=build_tiny_tokenizer(), patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token
    )  # fmt: skip
    inputs = processor(images=Image.open(path / "photo.png"), text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    want = ref[0, inputs["input_ids"].shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    if eos in want:
        want = want[: want.index(eos) + 1]
    assert out["token_ids"] == want
    assert out["prompt_tokens"] == inputs["input_ids"].shape[1]
    assert out["image_tokens"] == 9


def test_generate_streams_text(hf_dir):
    path, _ = hf_dir
    proc = cli("generate", "--model", path, "--image", path / "photo.png", "--prompt", PROMPT,
               "--raw", "--max-new-tokens", 4)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "converting it in memory" in proc.stderr


def test_animated_image_and_a_one_token_answer(hf_dir, tmp_path):
    """An animated GIF: its first frame, said on stderr (issue 18.2). A one-token answer has
    no decode step to time: `decode_tokens_per_s` is null, not 0.0 (issue 18.6)."""
    path, _ = hf_dir
    frames = [Image.new("RGB", (40, 30), colour) for colour in ("red", "green", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    proc = cli("generate", "--model", path, "--image", tmp_path / "anim.gif", "--prompt", PROMPT,
               "--raw", "--max-new-tokens", 1, "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (
        f"warning: --image {tmp_path / 'anim.gif'}: an animated image of 3 frames; only the "
        f"first is used (--video {tmp_path / 'anim.gif'} takes its frames as a video)"
    ) in proc.stderr.splitlines()
    out = json.loads(proc.stdout)
    assert len(out["token_ids"]) == 1
    assert out["decode_tokens_per_s"] is None


def test_help_lists_every_template_name(capsys):
    """`--template bogus` lists the aliases (qwen_2, v1) too; so must --help (issue 18.6)."""
    from llava_jax.cli.main import main
    from llava_jax.data.templates import ALIASES, TEMPLATES

    for command in ("generate", "chat"):
        assert main([command, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        missing = [n for n in [*TEMPLATES, *ALIASES] if f"{n}," not in text and f"{n})" not in text]
        assert not missing, f"{command} --help does not list {missing}"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "missing.png"], "missing.png"),
        (["--image", "notes.txt"], "notes.txt"),
        (["--image", "truncated.jpg"], "truncated.jpg"),
        (["--image", "photo.png", "--image", "photo.png"], "placeholder"),
    ],
    ids=["missing", "not-an-image", "truncated-jpeg", "placeholder-mismatch"],
)
def test_bad_input_is_one_line(hf_dir, args, message):
    path, _ = hf_dir
    (path / "notes.txt").write_text("hello")
    jpeg = path / "truncated.jpg"
    Image.new("RGB", (64, 64), "red").save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    args = [str(path / a) if a.endswith((".png", ".txt", ".jpg")) else a for a in args]
    proc = cli("generate", "--model", path, *args, "--prompt", PROMPT, "--raw")
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("llava-jax: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == errors[0]
    assert message in errors[0], errors[0]


def test_prompt_longer_than_context(hf_dir):
    path, _ = hf_dir
    proc = cli("generate", "--model", path, "--prompt", "word " * 300, "--raw")
    assert proc.returncode == 2
    assert "context" in proc.stderr.strip().splitlines()[-1]


def test_model_dir_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_tiny.llava().config.to_dict()))
    proc = cli("generate", "--model", tmp_path, "--prompt", "hi", "--raw")
    assert proc.returncode == 2
    assert "safetensors" in proc.stderr.strip().splitlines()[-1]


def test_chat_session(hf_dir):
    """Two turns with an image added mid-conversation, /reset, and EOF to leave."""
    path, _ = hf_dir
    script = f"/image {path / 'photo.png'}\nWhat is it?\nAnd now?\n/reset\nHello\n"
    proc = subprocess.run(
        [sys.executable, "-m", "llava_jax.cli.main", "chat", "--model", str(path),
         "--template", "vicuna_v1", "--max-new-tokens", "3"],
        input=script, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("assistant> ") == 3
    assert "(image added: 1 pending)" in proc.stderr and "(history cleared)" in proc.stderr


def test_default_length_fits_the_context(hf_dir):
    """Without --max-new-tokens the answer takes what the 256-token context leaves (the
    default 256 would not fit beside any prompt), and says so."""
    path, _ = hf_dir
    proc = cli("generate", "--model", path, "--image", path / "photo.png", "--prompt", PROMPT,
               "--raw", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    room = 256 - out["prompt_tokens"]
    assert f"(at most {room} new tokens" in proc.stderr, proc.stderr
    assert len(out["token_ids"]) <= room


def test_given_length_that_does_not_fit_is_refused(hf_dir):
    path, _ = hf_dir
    proc = cli("generate", "--model", path, "--prompt", PROMPT.replace("<image>", ""), "--raw",
               "--max-new-tokens", 250)  # fmt: skip
    assert proc.returncode == 2
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("llava-jax: error: --max-new-tokens 250: the prompt's "), last
    assert "of the model's context of 256; ask for at most that, or leave it out" in last


def chat(path, script: bytes, *flags):
    return subprocess.run(
        [sys.executable, "-m", "llava_jax.cli.main", "chat", "--model", str(path),
         "--template", "vicuna_v1", *flags],
        input=script, capture_output=True, timeout=300,
    )  # fmt: skip


def test_chat_outlives_a_full_context(hf_dir):
    """With the default answer length (capped, said once), a conversation past the context
    drops its oldest exchange and goes on; a message too long even alone, a bad byte and an
    unknown command are errors, and the chat stays open."""
    path, _ = hf_dir
    long = b"word " * 14  # with the system prompt and a capped answer, two do not fit
    script = b"\n".join([long, long, b"word " * 300, b"\xff oops", b"/bogus", b"hi", b""])
    proc = chat(path, script)
    stdout, stderr = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, stderr
    assert stdout.count("assistant> ") == 3, (stdout, stderr)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3, stderr
    assert "1025 tokens, more than the model's context of 256: not sent" in errors[0]
    assert "not valid UTF-8 (byte 0xff" in errors[1]
    assert "unknown command /bogus" in errors[2] and "/reset" in errors[2]
    assert stderr.count("(answers are capped at what the model's context of 256 tokens") == 1
    assert "(dropped the oldest 1 exchange(s)" in stderr
    assert "Traceback" not in stderr


def test_chat_refuses_a_length_the_context_cannot_hold(hf_dir):
    path, _ = hf_dir
    proc = chat(path, b"Hello\n", "--max-new-tokens", "256")
    assert proc.returncode == 2
    assert proc.stderr.decode().strip().splitlines()[-1] == (
        "llava-jax: error: --max-new-tokens 256 leaves no room for a message in the model's "
        "context of 256 tokens"
    )
