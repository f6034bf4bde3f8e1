"""The step's one all-reduce as a typed record: what one rank packs is what unpack reads, field by field, and the
sum of packed records over ranks is the record of the summed fields."""
import torch

from trainer.data.samples import BAD_KINDS
from trainer.training.step import StepAgreement


def _batch(read: int, bad: list[int], sets: list[int]) -> dict:
    return {"n_read": torch.tensor(read), "bad_counts": torch.tensor(bad), "set_counts": torch.tensor(sets)}


def test_a_packed_agreement_unpacks_to_the_same_fields():
    mine = StepAgreement.zeros(3)
    bad = [0] * len(BAD_KINDS)
    bad[BAD_KINDS.index("malformed_json")] = 2
    mine.add_batch(_batch(10, bad, [4, 0, 4]))
    mine.add_batch(_batch(9, [1] + [0] * (len(BAD_KINDS) - 1), [1, 6, 1]))
    mine.stop = 1
    mine.nonfinite = torch.tensor(True)  # a device flag, as train_step hands it
    packed = mine.pack(torch.device("cpu"))
    assert packed.dtype == torch.long and packed.shape == (3 + len(BAD_KINDS) + 3,)
    back = StepAgreement.unpack(packed)
    assert (back.nonfinite, back.stop, back.samples_read) == (1, 1, 19)
    assert back.bad_counts == [1, 0, 2] + [0] * (len(BAD_KINDS) - 3)
    assert back.set_counts == [5, 6, 5]


def test_summing_packed_agreements_sums_each_field():
    ranks = [StepAgreement(stop=s, samples_read=r, set_counts=[r, 0], nonfinite=torch.tensor(n))
             for s, r, n in ((0, 8, False), (1, 9, True), (0, 7, False))]
    total = StepAgreement.unpack(sum(a.pack(torch.device("cpu")) for a in ranks))
    assert (total.nonfinite, total.stop, total.samples_read, total.set_counts) == (1, 1, 24, [24, 0])
    assert total.bad_counts == [0] * len(BAD_KINDS)


def test_without_counts_the_record_still_carries_the_flag():
    back = StepAgreement.unpack(StepAgreement(nonfinite=torch.tensor(False)).pack(torch.device("cpu")))
    assert back == StepAgreement(nonfinite=0)
