"""tfds builders (AI-TOD, TinyPerson, DOTA-v2.0) that build and read without TensorFlow."""
