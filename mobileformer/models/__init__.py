"""The model families and the layers they share.

One module per family (`mobile_former`, `mlp_mixer` (Mixer, gMLP, ResMLP), `fnet`, `repmlpnet`,
`repmlp_resnet`); `backbone` is the interface every model class shares, `layers` and `rep_layers`
the building blocks, `model_utils` the helpers that inspect or fold a built model. Importing a
family module registers its builder with `mobileformer.registry`; `mobileformer` imports them all.
Nothing is imported here, so that infrastructure can use `model_utils` without loading a family.
"""

FAMILIES = ('mobile_former', 'mlp_mixer', 'fnet', 'repmlpnet', 'repmlp_resnet')
SHARED = ('backbone', 'layers', 'rep_layers', 'model_utils')
