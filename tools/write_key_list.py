"""Writes tests/fixtures/unimedclip_vit_b16_keys.json: every official state-dict key of the paper
config with its shape and whether it is trainable, from the PyTorch reference. The Rust model test
checks that the engine asks for exactly these keys and shapes (without shipping an 800 MB file).

    python tools/write_key_list.py
"""

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.reference.model import Config, expected_shapes, is_trainable  # noqa: E402


def main():
    cfg = Config.from_json(ROOT / "weights/configs/unimedclip-vit-b16.json")
    keys = [{"key": k, "shape": list(shape), "trainable": is_trainable(k)} for k, shape in expected_shapes(cfg).items()]
    out = ROOT / "tests/fixtures/unimedclip_vit_b16_keys.json"
    out.write_text(json.dumps(keys, indent=0) + "\n")
    print(f"{out.relative_to(ROOT)}: {len(keys)} keys")


if __name__ == "__main__":
    main()
