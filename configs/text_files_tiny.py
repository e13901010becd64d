"""Your own folder of text on a laptop: the shakespeare_tiny model and schedule, on `text_files`.

    python -m kforcing_jax.main.pipeline --config=configs/text_files_tiny.py \
        --config.data.manual_dir=/path/to/folder --workdir=runs/mytext

The folder holds *.txt files (one document each) and/or *.jsonl files (one {"text": ...}
document per line), searched recursively; 5% of the documents are held out for validation and
5% for test (kforcing_jax/data/text_files.py). A byte-level BPE of data.vocab_size tokens is
trained on the train split. The built dataset, tokenizer and packed rows live in
<data.data_dir>/text_files: give each folder its own --config.data.data_dir.
"""

from configs import shakespeare_tiny


def get_config():
  c = shakespeare_tiny.get_config()
  c.data.name = 'text_files'
  c.data.manual_dir = ''  # required: --config.data.manual_dir=/path/to/folder
  return c
