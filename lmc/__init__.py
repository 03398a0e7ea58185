"""lmc: offline LLM compiler and format converter with a slim runtime."""

__version__ = "0.1.0"

__all__ = ["pipeline", "EngineConfig", "TurbomindEngineConfig", "PytorchEngineConfig", "GenerationConfig", "__version__"]


def __getattr__(name):  # keep `import lmc` light: torch loads only when the API is used
    if name == "pipeline":
        from lmc.api import pipeline

        return pipeline
    if name in ("EngineConfig", "TurbomindEngineConfig", "PytorchEngineConfig"):
        from lmc.runtime import config

        return getattr(config, name)
    if name == "GenerationConfig":
        from lmc.runtime.sampling import GenerationConfig

        return GenerationConfig
    raise AttributeError(name)
