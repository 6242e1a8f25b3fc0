# The fixture job's stages that load a model (tests check each one saw images)
MODEL_STAGES = [
    "collect",
    "caption",
    "grounding",
    "region_caption",
    "refine",
    "filter",
    "proposals",
    "segment",
]
