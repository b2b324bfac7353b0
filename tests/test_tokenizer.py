from transformers import CLIPTokenizer

from spo.world.scenes import all_vocabulary
from spo.world.tokenizer import write_tokenizer


def test_every_grammar_word_is_one_token_and_any_text_still_tokenizes(tmp_path):
    tok = write_tokenizer(tmp_path)
    for word in all_vocabulary():
        assert len(tok.tokenize(word)) == 1, word
    ids = tok("A photograph of 3 cats!").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:-1]


def test_saved_tokenizer_loads_with_stock_from_pretrained(tmp_path):
    tok = write_tokenizer(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    text = ["a large red circle on the left", "a blue square above a yellow triangle", ""]
    assert tok(text, padding="max_length", max_length=24).input_ids == again(text, padding="max_length", max_length=24).input_ids
    assert again.model_max_length == 24
