"""Ray integration: runtime_env plugin, Serve readiness and health, multiplexed models,
prewarm and cache-aware placement (issue 7).

The pure parts import without Ray; the Serve helpers import Ray when used.
"""

from .deploy import DeployFailed, check_placement, deploy
from .placement import PlacementUnsatisfiable, artifact_label, modelcast_options, node_labels
from .replica import ArtifactUnhealthy, WarmArtifacts, model_loader, multiplexed_model_id

__all__ = ["ArtifactUnhealthy", "DeployFailed", "PlacementUnsatisfiable", "WarmArtifacts", "artifact_label",
           "check_placement", "deploy", "model_loader", "modelcast_options", "multiplexed_model_id", "node_labels"]
