"""Generating LLaVA-Instruct-style data from COCO captions and boxes through an LLM
(`generate.py`), and CC3M-595K-style caption filtering (`filter_captions.py`)."""
