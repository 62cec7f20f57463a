"""`llava-jax instruct` from a tiny COCO-format fixture through a local OpenAI-compatible
server: context building, reply parsing and validation, resume, the CLI, and the output
streamed through the data pipeline."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import tiny_configs
from llm_server import FakeLLM
from PIL import Image

from llava_jax.checks.tiny_tokenizer import build_tiny_tokenizer
from llava_jax.eval.llm_client import ChatClient
from llava_jax.instruct.coco import context_text, load_contexts, normalise_box
from llava_jax.instruct.prompts import CONVERSATION_SYSTEM, DETAIL_INSTRUCTIONS
from llava_jax.instruct.writer import (
    ReplyError,
    build_messages,
    detail_instruction,
    generate,
    load_few_shot,
    parse_qa,
    to_record,
)
from llava_jax.media.processor_config import ImageProcessorConfig

TINY = tiny_configs.LLAVA

CAPTIONS = {
    1: ["A dog runs on grass.", "A brown dog in a park.", "A dog chasing a ball.",
        "A happy dog outdoors.", "A dog playing fetch."],
    2: ["Two cats on a sofa.", "Cats sleeping.", "A pair of cats resting.",
        "Two kittens on a couch.", "Cats curled up together."],
    3: ["A red bus on a street.", "A bus at a stop.", "A double-decker bus.",
        "A bus in the city.", "A red bus with passengers."],
}  # fmt: skip


@pytest.fixture
def coco(tmp_path):
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 200, "height": 100}
              for i in (1, 2, 3, 4)]  # image 4 has no captions  # fmt: skip
    caps = [{"id": 10 * i + j, "image_id": i, "caption": c}
            for i, cs in CAPTIONS.items() for j, c in enumerate(cs)]  # fmt: skip
    (tmp_path / "captions.json").write_text(json.dumps({"images": images, "annotations": caps}))
    boxes = [{"id": 1, "image_id": 1, "category_id": 18, "bbox": [20, 10, 50, 40], "area": 1,
              "iscrowd": 0},
             {"id": 2, "image_id": 1, "category_id": 37, "bbox": [150, 80, 60, 30], "area": 1,
              "iscrowd": 0}]  # fmt: skip
    categories = [{"id": 18, "name": "dog", "supercategory": "animal"},
                  {"id": 37, "name": "sports ball", "supercategory": "sports"}]  # fmt: skip
    (tmp_path / "instances.json").write_text(
        json.dumps({"images": images, "annotations": boxes, "categories": categories})
    )
    return tmp_path / "captions.json", tmp_path / "instances.json"


def test_context_and_boxes(coco):
    contexts = load_contexts(*coco)
    assert [c.image_id for c in contexts] == [1, 2, 3]
    assert normalise_box([20, 10, 50, 40], 200, 100) == (0.1, 0.1, 0.35, 0.5)
    assert normalise_box([150, 80, 60, 30], 200, 100) == (0.75, 0.8, 1.0, 1.0)  # clipped
    text = context_text(contexts[0].captions, contexts[0].boxes)
    assert text == "\n".join(CAPTIONS[1]) + (
        "\n\ndog: [0.100, 0.100, 0.350, 0.500]\nsports ball: [0.750, 0.800, 1.000, 1.000]"
    )
    assert contexts[1].boxes == ()


@pytest.mark.parametrize(
    "file, change, message",
    [
        ("captions.json", lambda d: d["annotations"][0].pop("caption"),
         ": annotations[0]: missing field(s) caption"),
        ("instances.json", lambda d: d["annotations"][1].update(image_id=99),
         ": annotations[1]: no image with id 99"),
        ("instances.json", lambda d: d["annotations"][0].update(category_id=5),
         ": annotations[0]: no category with id 5"),
        ("instances.json", lambda d: d.update(categories={"18": "dog"}),
         " (a COCO annotation file): field 'categories' should be a list; got a JSON object"),
    ],
)  # fmt: skip
def test_a_coco_file_of_the_wrong_shape_is_one_line_naming_it(coco, file, change, message):
    path = coco[0].with_name(file)
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as error:
        load_contexts(*coco)
    assert str(error.value) == f"{path}{message}"


def test_cli_a_captions_file_that_is_a_list_is_one_line(coco, tmp_path):
    coco[0].write_text("[]")
    proc = cli("instruct", "--captions", coco[0], "--type", "conversation", "--out",
               tmp_path / "x.jsonl", "--model", "m")  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"llava-jax: error: {coco[0]} (a COCO annotation file): expected a JSON object with "
        "'images', 'annotations'; got a list"
    ]


def test_messages_follow_the_paper():
    few = load_few_shot("conversation")
    messages = build_messages(few, "CONTEXT")
    assert messages[0] == {"role": "system", "content": CONVERSATION_SYSTEM}
    assert CONVERSATION_SYSTEM.startswith("You are an AI visual assistant, and you are seeing")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[-1]["content"] == "CONTEXT"
    assert len(DETAIL_INSTRUCTIONS) == len(set(DETAIL_INSTRUCTIONS)) == 16


def test_few_shot_directory(tmp_path):
    (tmp_path / "000_caps.txt").write_text("caps 0")
    (tmp_path / "000_conv.txt").write_text("conv 0")
    (tmp_path / "001_caps.txt").write_text("caps 1")
    (tmp_path / "001_conv.txt").write_text("conv 1")
    (tmp_path / "system_message.txt").write_text("SYSTEM\n")
    few = load_few_shot("complex", tmp_path)
    assert few.system == "SYSTEM" and few.examples == (("caps 0", "conv 0"), ("caps 1", "conv 1"))
    (tmp_path / "002_caps.txt").write_text("orphan")
    with pytest.raises(ValueError, match="002_conv.txt"):
        load_few_shot("complex", tmp_path)


@pytest.mark.parametrize(
    "reply, want",
    [
        ("Question:\nWhat?\n===\nAnswer:\nThat.\n", [("What?", "That.")]),
        ("Question: A?\nAnswer: B.\n===\nQuestion: C?\n===\nAnswer:\nD\nE", [("A?", "B."),
                                                                           ("C?", "D\nE")]),
        ("Question:\nA?\n===\nAnswer:\nB.\n===\nQuestion:\nCut off?", [("A?", "B.")]),
    ],
)  # fmt: skip
def test_parse_qa(reply, want):
    assert parse_qa(reply) == want


@pytest.mark.parametrize(
    "reply, reason",
    [
        ("   ", "empty_reply"),
        ("I cannot help with that.", "no_question_answer"),
        ("Answer: B\nQuestion: A?", "not_alternating"),
        ("Question: A?\nQuestion: B?\nAnswer: C", "not_alternating"),
        ("Question: A?\n===\nAnswer:\n===\n", "empty_turn"),
    ],
)
def test_parse_qa_rejects(reply, reason):
    with pytest.raises(ReplyError) as e:
        parse_qa(reply)
    assert e.value.reason == reason


def test_records(coco):
    image = load_contexts(*coco)[0]
    conv = to_record(image, "conversation", "Question:\nWhat?\n===\nAnswer:\nA dog.\n===\n"
                     "Question:\nWhere?\n===\nAnswer:\nA park.", 0)  # fmt: skip
    assert conv == {"id": "000000000001", "image": "000000000001.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A dog."},
        {"from": "human", "value": "Where?"}, {"from": "gpt", "value": "A park."}]}  # fmt: skip
    detail = to_record(image, "detail", "  A brown dog runs.  ", 0)
    instruction = detail["conversations"][0]["value"].removeprefix("<image>\n")
    assert instruction in DETAIL_INSTRUCTIONS and instruction == detail_instruction(1, 0)
    assert detail["conversations"][1] == {"from": "gpt", "value": "A brown dog runs."}
    drawn = {detail_instruction(i, 0) for i in range(200)}
    assert len(drawn) == 16  # every instruction gets used
    with pytest.raises(ReplyError, match="image"):
        to_record(image, "detail", "See <image> here", 0)
    with pytest.raises(ReplyError, match="declined"):
        to_record(image, "detail", "I'm sorry, but I cannot describe images.", 0)


def fake_reply(body):
    """Deterministic replies keyed by the image's first caption; the cat image fails."""
    context = body["messages"][-1]["content"]
    first = context.splitlines()[0]
    if "cats" in first.lower():
        return "Sorry, I cannot do that."
    if body["messages"][0]["content"].startswith("You are an AI visual assistant looking"):
        if "Question:" in body["messages"][0]["content"]:  # complex
            return f"Question:\nWhy is this notable?\n===\nAnswer:\nBecause: {first}"
        return f"A detailed look: {first}"
    return f"Question:\nWhat is shown?\n===\nAnswer:\n{first}\n===\nQuestion:\nMore?\nAnswer:\nYes."


def read(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_generate_resumes_without_duplicates(coco, tmp_path):
    contexts = load_contexts(*coco)
    out = tmp_path / "conv.jsonl"
    with FakeLLM(fake_reply) as llm:
        client = ChatClient(llm.base_url, "gen-1", cache_dir=tmp_path / "cache", concurrency=2)
        s1 = generate(client, contexts[:1], "conversation", out, echo=lambda m: None)
        with open(out, "a") as f:
            f.write('{"id": "0000')  # an interrupted write
        s2 = generate(client, contexts, "conversation", out, echo=lambda m: None)
        s3 = generate(client, contexts, "conversation", out, echo=lambda m: None)
    assert (s1.written, s2.written, s2.skipped_done, s3.written) == (1, 1, 1, 0)
    assert dict(s2.rejected) == {"no_question_answer": 1} == dict(s3.rejected)
    # Requests: image 1; then images 2 and 3; then nothing new (image 2's reply is cached).
    assert len(llm.requests) == 3
    records = read(out)
    assert sorted(r["id"] for r in records) == ["000000000001", "000000000003"]
    rejected = read(tmp_path / "conv.jsonl.rejected.jsonl")
    assert (
        rejected[0]["image"] == "000000000002.jpg" and rejected[0]["reason"] == "no_question_answer"
    )
    # The conversation type sees captions only; detail and complex the boxes too.
    assert "dog: [" not in llm.requests[0]["messages"][-1]["content"]


def test_auth_failure_is_reported(coco, tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with FakeLLM(fake_reply, key="sk-1") as llm:
        client = ChatClient(llm.base_url, "gen-1", api_key_env="NO_SUCH_KEY_VAR")
        with pytest.raises(PermissionError, match="set NO_SUCH_KEY_VAR"):
            generate(client, load_contexts(*coco), "detail", tmp_path / "d.jsonl",
                     echo=lambda m: None)  # fmt: skip


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "llava_jax.cli.main", *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=env)  # fmt: skip


@pytest.mark.parametrize("response_type", ["conversation", "detail", "complex"])
def test_cli_end_to_end_streams_through_the_data_pipeline(coco, tmp_path, response_type):
    captions, instances = coco
    out = tmp_path / f"{response_type}.jsonl"
    env = {**os.environ, "TEST_INSTRUCT_KEY": "sk-test"}
    with FakeLLM(fake_reply, key="sk-test") as llm:
        proc = cli("instruct", "--captions", captions, "--instances", instances, "--type",
                   response_type, "--out", out, "--model", "gen-1", "--base-url", llm.base_url,
                   "--api-key-env", "TEST_INSTRUCT_KEY", "--temperature", 0.7, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "2 samples written, 0 already there, 1 rejected" in proc.stdout
    assert llm.requests[0]["temperature"] == 0.7 and llm.requests[0]["max_tokens"] == 1024
    has_boxes = "dog: [0.100" in llm.requests[0]["messages"][-1]["content"] or any(
        "dog: [0.100" in r["messages"][-1]["content"] for r in llm.requests
    )
    assert has_boxes == (response_type != "conversation")
    records = read(out)
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in records)

    # The training pipeline reads the file and turns every record into a training example.
    from llava_jax.data.sources import open_source
    from llava_jax.data.transforms import SampleTransform

    for r in records:
        Image.new("RGB", (20, 10), "red").save(tmp_path / r["image"])
    dataset = open_source(str(out), image_root=str(tmp_path))
    transform = SampleTransform(TINY, ImageProcessorConfig.for_model(TINY), build_tiny_tokenizer(),
                                "vicuna_v1", max_len=2048, max_views=1)  # fmt: skip
    assert len(dataset) == 2
    for raw in dataset:
        assert raw.images == (f"{raw.id}.jpg",)
        example = transform(raw)
        assert (example.input_ids == 150).sum() == 9  # the image's tokens
        assert example.trained.sum() > 0


def test_cli_needs_instances_for_boxes(coco):
    proc = cli("instruct", "--captions", coco[0], "--type", "detail", "--out", "x.jsonl",
               "--model", "m")  # fmt: skip
    assert proc.returncode == 2 and "--type detail needs --instances" in proc.stderr


def many_images(tmp_path, n=20):
    """A captions file of `n` images with one caption each."""
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 10, "height": 10}
              for i in range(1, n + 1)]  # fmt: skip
    caps = [{"id": i, "image_id": i, "caption": f"Picture {i}."} for i in range(1, n + 1)]
    path = tmp_path / "many_captions.json"
    path.write_text(json.dumps({"images": images, "annotations": caps}))
    return path


def free_port():
    """A local port where nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_fails_fast_and_non_zero_when_nothing_listens(tmp_path):
    out = tmp_path / "conv.jsonl"
    url = f"http://127.0.0.1:{free_port()}/v1"
    proc = cli("instruct", "--captions", many_images(tmp_path), "--type", "conversation",
               "--out", out, "--model", "m", "--base-url", url, "--max-retries", 1,
               "--backoff", 0, "--concurrency", 2)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "llava-jax: error: no sample generated: 8 of 8 requests failed, 12 not asked; first "
        f"error: {url}/chat/completions: gave up after 2 tries ("
    )
    assert "Connection refused" in last
    assert "0 samples written, 0 already there, 8 rejected (request_failed 8), 12 not asked" in (
        proc.stdout
    )
    assert len(read(tmp_path / "conv.jsonl.rejected.jsonl")) == 8


def test_a_404_stops_after_the_first_requests(tmp_path):
    with FakeLLM(fake_reply) as llm:
        client = ChatClient(llm.base_url + "/wrong", "m", concurrency=1, max_retries=3)
        summary = generate(client, load_contexts(many_images(tmp_path)), "conversation",
                           tmp_path / "out.jsonl", echo=lambda m: None)  # fmt: skip
    assert 8 <= len(llm.requests) <= 9  # the 9th may be in flight when the 8th fails
    assert (summary.written, summary.not_asked, dict(summary.rejected)) == (
        0, 12, {"request_failed": 8}
    )  # fmt: skip
    assert summary.failure().startswith("no sample generated: 8 of 8 requests failed, 12 not")
    assert "HTTP 404 no route /v1/wrong/chat/completions" in summary.failure()


def test_transient_failures_do_not_stop_early(tmp_path):
    with FakeLLM(fake_reply) as llm:
        llm.failures = {"Picture": [503] * 100}
        client = ChatClient(llm.base_url, "m", max_retries=0)
        summary = generate(client, load_contexts(many_images(tmp_path)), "conversation",
                           tmp_path / "out.jsonl", echo=lambda m: None)  # fmt: skip
    assert len(llm.requests) == 20 and summary.not_asked == 0
    assert summary.failure().startswith("no sample generated: 20 of 20 requests failed; first")
