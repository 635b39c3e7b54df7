"""tfds builders (AI-TOD, TinyPerson) that build and read without TensorFlow."""
