"""Special token ids shared by every tokenizer, vocabulary, task and model: the bottom floor, so data and
tasks can use them without importing the model (and flax)."""

PAD_ID = 0  # padding; segment id 0
BOS_ID = 1  # starts every decoder input (`models.shift_right`)
EOS_ID = 2  # ends every sequence
FIRST_FREE_ID = 3  # the first id a vocabulary may use for its own tokens
