"""Files: arlm checkpoint folders, Hugging Face import/export, GGUF export, prompt files."""
