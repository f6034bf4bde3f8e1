"""The from-scratch text tower (model.text_encoder=gru): word embeddings of the shard set's vocabulary and a
bidirectional GRU, as VSE-infinity's BiGRU. Its word embeddings may start from GloVe
(trainer.models.text_encoders.init_word_embeddings)."""
from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class GRUTextEncoder(nn.Module):
    """Word embeddings -> bidirectional GRU, the two directions averaged (VSE-infinity) -> word parts."""

    def __init__(self, vocab_size: int, word_dim: int, hidden: int, layers: int):
        super().__init__()
        self.out_dim = hidden
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.gru = nn.GRU(word_dim, hidden, num_layers=layers, batch_first=True, bidirectional=True)

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """tokens [B, T] right-padded, lengths [B] -> parts [B, T, hidden], zero past each length."""
        packed = pack_padded_sequence(self.embed(tokens), lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=tokens.size(1))
        return (out[..., : self.out_dim] + out[..., self.out_dim:]) / 2
