"""Zero-shot embedding (``task=embed``, run with ``task.fit: false``): cell embeddings of the validation
cells from the given weights, no training; kNN cell-type accuracy and the integration metrics, with PCA
of the expression as the baseline. To embed a whole file into ``.obsm`` use ``scgpt-embed``."""

from __future__ import annotations

from scgpt.tasks.integration import IntegrationTask


class EmbedTask(IntegrationTask):
    """The integration metrics of the untrained (zero-shot) embedding; writes the embedding map PNG."""
