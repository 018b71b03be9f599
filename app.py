"""MergeLab app: `python app.py` locally; Hugging Face Spaces runs this same file."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from views import build_app, launch_kwargs  # noqa: E402

demo = build_app()

if __name__ == "__main__":
    demo.launch(**launch_kwargs())
