"""What a trainer rank imports: the feed iterator, models for the demos, the training step."""
