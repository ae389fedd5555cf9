"""Training side of the triage model: data, fine-tuning, DSG-KD distillation, evaluation, export."""
