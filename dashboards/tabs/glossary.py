"""The glossary tab: what the maps are, in words a first-time user can follow. The tables of methods and
models come from the registry (``MethodSpec.glossary``, ``ModelSpec.notes``)."""

from __future__ import annotations

import panel as pn

from dashboards.tabs.base import Tab
from ssl_attention.registry import METHODS, MODELS, ROLE_LABELS

_CONCEPTS = """
### What is an attention head?
A ViT layer does not compute one attention pattern but *H* of them in parallel (12 in a ViT-B): each head has
its own query and key projections, so it can attend to different things, and their outputs are concatenated.
The map of head *h* in layer *l* is `A[l, h]` restricted to the patch tokens.

### Why heads specialise
DINO (Caron et al., 2021, *Emerging properties in self-supervised vision transformers*) showed that the CLS
attention heads of the last layer of a self-supervised ViT segment objects without ever being trained on
masks, and that **different heads attend to different objects or parts** (one head the head of a person,
another the body, a third the background). DINOv2 (Oquab et al., 2023) and its registers follow-up keep this
behaviour. Earlier layers are more local (small mean attention distance); deeper layers more global and
semantic. Looking at heads one by one is how those findings were made; the average hides them.

### Fused vs. head
The **fused** map is the mean over heads of the per-head maps of the same layer (for CLS attention: the CLS
row of the head-averaged matrix). It is what most "attention map" figures show. A single head is often much
sharper; the fused map blurs heads that disagree. The statistics tab measures that disagreement
(correlation and Jensen–Shannon divergence of each head with the fused map).

### Register tokens
DINOv2 with registers (Darcet et al., 2024, *Vision Transformers Need Registers*) and DINOv3 append a few
learnable tokens that carry no image content. Without them, large ViTs dump attention on a few low-information
background patches ("artifacts"). The maps here are on the patch grid only; the mass that went to CLS and
register tokens is kept separately as `prefix_mass` / `register_mass`.

### Attention rollout
Abnar & Zuidema (2020): attention of one layer says little about what the *output* depends on, because
information mixes across layers. Rollout multiplies the head-averaged attention matrices (plus the identity,
for the residual path) from the first layer up: `R_l = norm(mean_h A_l + I) · R_(l-1)`. Layer *l* shows the
rollout of layers 0..l. It is fused by construction, so it has no heads.

### Grad-CAM
Selvaraju et al. (2017), for the CNN (ResNet-50): the feature maps of a stage weighted by the spatial mean of
the gradient of the top-1 class score, summed over channels and clipped at zero. One map per stage
(`layer1` … `layer4`); a CNN has no attention heads.

### Random weights
When the warehouse was filled with `--weights random`, every model is the real architecture with seeded
random initialisation. The pipeline, storage and this dashboard work exactly as with pretrained weights, but
the maps show **the machinery, not a model's behaviour**: no head has learnt anything. A yellow banner says so
whenever the shown maps come from random weights. Re-run with pretrained weights (or a local checkpoint) to
see real attention.

### Colour scale
Values are raw patch values on the model's grid; display scaling happens only here. *Shared* scales the fused
map and the head to the same maximum (compare magnitudes); *independent* scales each to its own maximum
(compare shapes). *Contrast* sets what the colours span: **0 → max** (magnitudes), **min → max** (the whole
contrast of a near-uniform map: rollout, SigLIP's probe, flat heads), **clip to the 2nd–98th percentile** (a
few hot cells no longer flatten the rest), or **top 60% of the mass** (DINO's threshold: the fewest patches
holding 60% of the map's mass), as a *mask* (only those patches drawn, the rest left clear) or as a *contour*
(the whole map, 0 → max, with a white line around those patches; on the Heads tab). The colormaps are Bokeh's
256-colour palettes, the same on every tab and in the PNG export.

### Annotations on the maps
With annotations in the warehouse (`ssl-attention run --annotations FILE`: COCO instances JSON or WikiChurches
`building_parts.json`; a sample in `data/samples/annotations.json`), the *Annotations* switch of the Heads tab
outlines the image's regions on both maps, labelled by feature, in the frame the model saw: each box goes
through the model's own resize and crop, and a region the crop cut is drawn clipped and marked "(cut)". Beside
each map are its scores for the chosen feature: **IoU@90** (the map's top 10% of patches against the regions),
**coverage** (the share of the map's mass inside them) and the **pointing** game (does the hottest patch lie
in them?), with the same scores of the two baselines, a uniform map and a centred Gaussian, for comparison.
"""


def glossary_markdown() -> str:
    """Methods and models from the registry, then the concepts."""
    methods = "\n".join(
        f"| `{spec.name}` | {spec.label} | {ROLE_LABELS[spec.role]} | {'yes' if spec.per_head else 'no (fused only)'} "
        f"| {spec.glossary} |"
        for spec in METHODS.values()
    )
    models = "\n".join(
        f"| `{spec.slug}` | {spec.label} | {', '.join(spec.methods)} | {spec.notes} |" for spec in MODELS.values()
    )
    return (
        "## Glossary\n\n### Methods\n\n| method | name | role | per head | definition |\n|---|---|---|---|---|\n"
        f"{methods}\n\n### Models\n\n| model | name | methods | notes |\n|---|---|---|---|\n{models}\n"
        f"{_CONCEPTS}"
    )


class GlossaryTab(Tab):
    key = "glossary"
    label = "Glossary"

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.pane.Markdown(glossary_markdown(), max_width=900, sizing_mode="stretch_width")
