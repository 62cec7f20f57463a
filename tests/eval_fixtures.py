"""Tiny benchmark directories in each benchmark's published layout, for the eval tests.

Each `make_*` writes one into `root` and returns it; questions are few and short (the tiny
test model has a 256-token context) and images are 12 x 12 pictures.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image


def image(path: Path, seed: int = 0, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.RandomState(seed).randint(0, 255, (12, 12, 3), np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_scienceqa(root: Path) -> Path:
    def problem(subject, hint, img, grade, choices, answer, split="test"):
        return {"question": "Which one?", "choices": choices, "answer": answer, "hint": hint,
                "image": img, "subject": subject, "grade": grade, "split": split,
                "task": "closed choice", "topic": "t", "category": "c", "skill": "s",
                "lecture": "", "solution": ""}  # fmt: skip

    problems = {
        "p1": problem("natural science", "", "image.png", "grade2", ["dog", "cat"], 1),
        "p2": problem("natural science", "ctx", "image.png", "grade8", ["red", "blue", "tan"], 0),
        "p3": problem("social science", "h", None, "grade3", ["yes", "no"], 0),
        "p4": problem("language science", "", None, "grade10", ["a1", "b1"], 1),
        "p5": problem("natural science", "", None, "grade1", ["x", "y"], 0, "train"),
    }
    _json(root / "problems.json", problems)
    _json(root / "pid_splits.json", {"test": ["p1", "p2", "p3", "p4"], "train": ["p5"]})
    image(root / "images/test/p1/image.png", 1)
    image(root / "images/test/p2/image.png", 2)
    return root


def _vqa_answers(answers):
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
            for i, a in enumerate(answers)]  # fmt: skip


def make_vqav2(root: Path) -> Path:
    questions = [
        {"image_id": 42, "question": "Is it red?", "question_id": 420},
        {"image_id": 42, "question": "How many?", "question_id": 421},
        {"image_id": 7, "question": "What color?", "question_id": 70},
    ]
    _json(root / "v2_OpenEnded_mscoco_val2014_questions.json",
          {"questions": questions, "data_subtype": "val2014"})  # fmt: skip
    truth = [("yes/no", ["yes"] * 10), ("number", ["2"] * 2 + ["3"] * 8),
             ("other", ["red"] + ["blue"] * 9)]  # fmt: skip
    annotations = [
        {"question_id": q["question_id"], "image_id": q["image_id"], "answer_type": t,
         "question_type": "what", "multiple_choice_answer": a[-1], "answers": _vqa_answers(a)}
        for q, (t, a) in zip(questions, truth, strict=True)
    ]  # fmt: skip
    _json(root / "v2_mscoco_val2014_annotations.json", {"annotations": annotations})
    image(root / "val2014/COCO_val2014_000000000042.jpg", 3)
    image(root / "val2014/COCO_val2014_000000000007.jpg", 4)
    test = [{"image_id": 5, "question": "Why?", "question_id": 50},
            {"image_id": 5, "question": "Who?", "question_id": 51}]  # fmt: skip
    _json(root / "v2_OpenEnded_mscoco_test-dev2015_questions.json", {"questions": test[:1]})
    _json(root / "v2_OpenEnded_mscoco_test2015_questions.json", {"questions": test})
    image(root / "test2015/COCO_test2015_000000000005.jpg", 5)
    return root


def make_gqa(root: Path) -> Path:
    def q(image_id, question, answer, structural, semantic):
        return {"imageId": image_id, "question": question, "answer": answer,
                "fullAnswer": answer, "isBalanced": True,
                "types": {"structural": structural, "semantic": semantic}}  # fmt: skip

    _json(root / "testdev_balanced_questions.json", {
        "201": q("n1", "Is it on?", "yes", "verify", "rel"),
        "202": q("n1", "Which side?", "left", "query", "attr"),
        "203": q("n2", "What is it?", "table", "query", "obj"),
    })  # fmt: skip
    image(root / "images/n1.jpg", 6)
    image(root / "images/n2.jpg", 7)
    return root


def make_textvqa(root: Path) -> Path:
    data = [
        {"question_id": 1, "question": "What brand?", "image_id": "a1",
         "answers": ["Coca-Cola"] * 2 + ["coca cola"] + ["pepsi"] * 7},
        {"question_id": 2, "question": "What sign?", "image_id": "a2", "answers": ["stop"] * 10},
    ]  # fmt: skip
    _json(root / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": data})
    image(root / "train_images/a1.jpg", 8)
    image(root / "train_images/a2.jpg", 9)
    return root


def make_vizwiz(root: Path) -> Path:
    def q(name, answers, answer_type):
        answers = [{"answer": a, "answer_confidence": "yes"} for a in answers]
        answerable = int(answer_type != "unanswerable")
        return {"image": name, "question": "What is this?", "answers": answers,
                "answer_type": answer_type, "answerable": answerable}  # fmt: skip

    rows = [q("VizWiz_val_00000000.jpg", ["unanswerable"] * 10, "unanswerable"),
            q("VizWiz_val_00000001.jpg", ["white"] * 3 + ["grey"] * 7, "other"),
            q("VizWiz_val_00000002.jpg", ["yes"] * 10, "yes/no")]  # fmt: skip
    _json(root / "Annotations/val.json", rows)
    for i, r in enumerate(rows):
        image(root / "val" / r["image"], 10 + i)
    return root


def make_pope(root: Path) -> Path:
    for category in ("adversarial", "popular", "random"):
        _jsonl(root / f"coco/coco_pope_{category}.json", [
            {"question_id": 1, "image": "COCO_val2014_000000000001.jpg",
             "text": "Is there a dog in the image?", "label": "yes"},
            {"question_id": 2, "image": "COCO_val2014_000000000001.jpg",
             "text": "Is there a cat in the image?", "label": "no"},
        ])  # fmt: skip
    image(root / "val2014/COCO_val2014_000000000001.jpg", 13)
    return root


def make_pope_grid(root: Path, images: int, per_image: int) -> Path:
    """POPE with `per_image` questions about each of `images` images in every category,
    interleaved (question i asks about image i % images), as POPE's files mix images."""
    objects = ("dog", "cat", "car", "tree", "cup", "bus", "kite", "sink")
    for category in ("adversarial", "popular", "random"):
        _jsonl(root / f"coco/coco_pope_{category}.json", [
            {"question_id": i + 1, "image": f"COCO_val2014_{i % images:012d}.jpg",
             "text": f"Is there a {objects[i % len(objects)]} in the image?",
             "label": "yes" if i % 2 else "no"}
            for i in range(images * per_image)
        ])  # fmt: skip
    for i in range(images):
        image(root / f"val2014/COCO_val2014_{i:012d}.jpg", 100 + i)
    return root


MME_SPLIT_LAYOUT = ("artwork", "celebrity", "landmark", "posters", "scene")


def make_mme(root: Path) -> Path:
    from llava_jax.eval.mme import COGNITION, PERCEPTION

    for i, subtask in enumerate(PERCEPTION + COGNITION):
        folder = root / subtask
        if subtask in MME_SPLIT_LAYOUT:
            texts, images = folder / "questions_answers_YN", folder / "images"
        else:
            texts = images = folder
        texts.mkdir(parents=True, exist_ok=True)
        (texts / "0001.txt").write_text(
            "Is this a cat? Please answer yes or no.\tYes\n"
            "Is this a dog? Please answer yes or no.\tNo\n"
        )
        image(images / ("0001.png" if i % 2 else "0001.jpg"), 20 + i)
    return root


def _b64_image(seed: int) -> str:
    buf = io.BytesIO()
    image_path = Image.fromarray(np.random.RandomState(seed).randint(0, 255, (12, 12, 3), np.uint8))
    image_path.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


MMBENCH_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category",
                   "image", "source", "l2-category", "comment", "split"]  # fmt: skip


def write_tsv(path: Path, columns, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(columns)
        w.writerows(rows)


def make_mmbench(root: Path) -> Path:
    """Two questions without their rotations: the task rotates them."""
    rows = [
        ["10", "Which animal?", "nan", "dog", "cat", "cow", "", "B", "animals", _b64_image(30),
         "src", "perception", "nan", "dev"],
        ["11", "Is it day?", "A hint.", "yes", "no", "", "", "A", "time", "10", "src",
         "reasoning", "nan", "dev"],
    ]  # fmt: skip
    write_tsv(root / "mmbench_dev_20230712.tsv", MMBENCH_COLUMNS, rows)
    return root


def make_mmbench_released(root: Path) -> Path:
    """As the released TSVs: every rotation of a question is a row of its own, with index
    question + k * 1,000,000, its options and answer rotated, and the image given by the
    question's index. Questions 10 (3 options), 11 (2) and 12 (4)."""

    def row(index, question, options, answer, category, l2, image):
        options = (options + [""] * 4)[:4]
        return [str(index), question, "nan", *options, answer, category, image, "src", l2,
                "nan", "dev"]  # fmt: skip

    rows = [
        row(10, "Which animal?", ["dog", "cat", "cow"], "B", "animals", "perception",
            _b64_image(30)),
        row(11, "Is it day?", ["yes", "no"], "A", "time", "reasoning", _b64_image(31)),
        row(12, "Which colour?", ["red", "green", "blue", "tan"], "D", "colour", "perception",
            _b64_image(32)),
        row(1000010, "Which animal?", ["cat", "cow", "dog"], "A", "animals", "perception", "10"),
        row(1000011, "Is it day?", ["no", "yes"], "B", "time", "reasoning", "11"),
        row(1000012, "Which colour?", ["green", "blue", "tan", "red"], "C", "colour",
            "perception", "12"),
        row(2000010, "Which animal?", ["cow", "dog", "cat"], "C", "animals", "perception", "10"),
        row(2000012, "Which colour?", ["blue", "tan", "red", "green"], "B", "colour",
            "perception", "12"),
        row(3000012, "Which colour?", ["tan", "red", "green", "blue"], "A", "colour",
            "perception", "12"),
    ]  # fmt: skip
    write_tsv(root / "mmbench_dev_20230712.tsv", MMBENCH_COLUMNS, rows)
    return root


def make_llava_bench(root: Path) -> Path:
    _jsonl(root / "questions.jsonl", [
        {"question_id": 0, "image": "001.jpg", "text": "What is it?", "category": "conv"},
        {"question_id": 1, "image": "001.jpg", "text": "Describe it.", "category": "detail"},
        {"question_id": 2, "image": "002.jpg", "text": "Why?", "category": "complex"},
    ])  # fmt: skip
    _jsonl(
        root / "context.jsonl",
        [
            {"id": "001", "image": "001.jpg", "caption": "A red bus."},
            {"id": "002", "image": "002.jpg", "caption": "A cat."},
        ],
    )
    _jsonl(root / "answers_gpt4.jsonl", [{"question_id": i, "text": f"reference {i}"}
                                         for i in range(3)])  # fmt: skip
    image(root / "images/001.jpg", 40)
    image(root / "images/002.jpg", 41)
    return root


def make_llava_bench_coco(root: Path) -> Path:
    _jsonl(root / "qa90_questions.jsonl", [
        {"question_id": 0, "image": "000000000009.jpg", "text": "What is it?", "category": "conv"},
    ])  # fmt: skip
    _jsonl(root / "qa90_gpt4_answer.jsonl", [{"question_id": 0, "text": "reference 0"}])
    _jsonl(root / "caps_boxes_coco2014_val_80.jsonl", [
        {"id": "000000000009", "image": "000000000009.jpg",
         "captions": ["A dog on grass.", "A brown dog."],
         "instances": [{"category": "dog", "bbox": [0.1, 0.2, 0.5, 0.75]}]},
    ])  # fmt: skip
    image(root / "val2014/COCO_val2014_000000000009.jpg", 42)
    return root


def make_mmvet(root: Path) -> Path:
    _json(root / "mm-vet.json", {
        "v1_0": {"imagename": "v1_0.png", "capability": ["rec", "ocr"], "question": "Text?",
                 "answer": "stop"},
        "v1_1": {"imagename": "v1_1.png", "capability": ["rec"], "question": "Animal?",
                 "answer": "cat"},
    })  # fmt: skip
    image(root / "images/v1_0.png", 43)
    image(root / "images/v1_1.png", 44)
    return root
