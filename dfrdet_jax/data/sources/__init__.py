"""Data sources: synthetic, COCO-format (AI-TOD, TinyPerson) and DOTA-v2.0."""
