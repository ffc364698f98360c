"""REALM's data: tokenisation, blocks, QA sets, masking, loaders.

  tokenizer  WordPiece from vocab.txt; the query / block / MLM-join / reader-join layouts
  sources    JSONL / text folder / TFDS / HF block_records readers; bad input answered clearly
  blocks     documents → ≤288-wordpiece blocks (uids), TFDS `realm_blocks`, `BlockCorpus`
  joins      pre-tokenised blocks and the vectorised query × candidate joins
  examples   pre-training sentences with salient spans, TFDS `realm_sentences`
  masking    salient span masking (taggers) and the random-masking ablations
  qa         open-QA sets, TFDS `realm_qa`, SQuAD/NQ exact match, CuratedTrec regexes
  synthetic  a generated knowledge base of fictional people
  pipeline   grain loaders (sharded per host, resumable) → global arrays
"""
