"""schnet-md: a learned SchNet potential as a production molecular-dynamics backend.

Public API (see README.md):
    SchNet, SchNetConfig, config_from_preset     the model              (schnet_md.model)
    load_model, save_model                       the model file         (schnet_md.modelfile)
    create_torch_force, export_model             OpenMM export          (schnet_md.export)
    read_rmd17                                   data                   (schnet_md.data)
"""

import torch as _torch  # noqa: F401  (first: openmmtorch's plugins need torch's libraries loaded)

__version__ = "0.1.0"
