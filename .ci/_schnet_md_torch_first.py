"""Loaded at start-up by .venv's _schnet_md_torch_first.pth (written by .ci/setup-env).

openmm-torch's wheel links torch's CUDA libraries (libnvrtc, libtorch) without a path to them; they only
resolve once `import torch` has loaded them. So a plain script that imports openmm or openmmtorch before
torch fails (`ImportError: libnvrtc.so.12`), or OpenMM silently drops the TorchForce kernels. This hook
imports torch just before the first import of openmm or openmmtorch, then removes itself; nothing is
imported at start-up.
"""

import sys


class _TorchFirst:
    def find_spec(self, name, path=None, target=None):
        if name in ("openmm", "openmmtorch", "simtk"):
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            try:
                import torch  # noqa: F401
            except ImportError:
                pass
        return None


sys.meta_path.insert(0, _TorchFirst())
