"""`forge prepare`: a pipeline of small streaming steps from raw files to tokenized Parquet shards."""
