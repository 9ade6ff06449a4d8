"""Training utilities shared by pretraining and fine-tuning: schedules, the checkpoint format, distributed setup."""
