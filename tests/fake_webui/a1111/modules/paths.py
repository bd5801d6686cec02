"""modules/paths.py: where the WebUI keeps models (tests point it at a temporary folder)."""

models_path = "models"
data_path = "."
script_path = "."
