"""Fine-tuning a pretrained checkpoint: supervised fine-tuning (SFT) on chat data, fully or with
LoRA adapters (see loop.py, data.py, lora.py, vocab.py; the chat template is minillm/data/chat.py)."""
