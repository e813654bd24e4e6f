"""saft-filter inside other people's data pipelines: a datatrove filter (``datatrove_filter``) and a NeMo Curator stage
(``curator_stage``), both scoring in-process with the model and subspace ``saft filter`` loads (``local``).

Each module is imported only by the pipelines that use it, and needs its framework (the ``datatrove`` and ``curator``
extras). The service never imports this package (an import-linter contract in pyproject says so).

Owns: nothing but the package. Must not: import its modules or a pipeline framework, so that importing the package
needs neither datatrove nor NeMo Curator; and the service, the CLI and the Ray engine must not import it.
"""
