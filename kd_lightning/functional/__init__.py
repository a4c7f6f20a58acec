"""Stateless twins of :mod:`kd_lightning.losses`; each loss module calls one of these cores."""

from kd_lightning.functional.contrastive import crd_nce_loss, sample_negatives
from kd_lightning.functional.feature import (
    attention_transfer,
    fitnets_hint,
    flow_of_solution_procedure,
    neuron_selectivity_transfer,
    variational_information,
)
from kd_lightning.functional.relation import (
    correlation_congruence,
    probabilistic_knowledge_transfer,
    relational_kd,
    similarity_preserving,
)
from kd_lightning.functional.response import decoupled_kd, dist_loss, logit_standardization_kd
from kd_lightning.functional.soft_target import (
    IGNORE_INDEX,
    hard_label_cross_entropy,
    logit_matching_mse,
    soft_target_kl,
)
from kd_lightning.functional.sparse_soft_target import (
    sampled_log_probs,
    sparse_soft_target_kl,
    topk_log_probs,
)
from kd_lightning.functional.token import (
    TOKEN_IGNORE_INDEX,
    check_vocab_sizes,
    crop_to_shared_vocab,
    token_divergence,
    token_forward_kl,
    token_generalized_jsd,
    token_reverse_kl,
    token_total_variation,
    token_weights,
)
from kd_lightning.functional.token_chunked import (
    chunked_token_divergence,
    fused_linear_token_divergence,
)
from kd_lightning.functional.token_sparse import sparse_token_divergence
from kd_lightning.functional.transformer import (
    attention_map_loss,
    hidden_state_cosine,
    hidden_state_mse,
    token_cross_entropy,
)

__all__ = [
    "IGNORE_INDEX",
    "TOKEN_IGNORE_INDEX",
    "attention_map_loss",
    "attention_transfer",
    "check_vocab_sizes",
    "chunked_token_divergence",
    "crop_to_shared_vocab",
    "correlation_congruence",
    "crd_nce_loss",
    "decoupled_kd",
    "dist_loss",
    "fitnets_hint",
    "fused_linear_token_divergence",
    "flow_of_solution_procedure",
    "hard_label_cross_entropy",
    "hidden_state_cosine",
    "hidden_state_mse",
    "logit_matching_mse",
    "logit_standardization_kd",
    "neuron_selectivity_transfer",
    "probabilistic_knowledge_transfer",
    "relational_kd",
    "sample_negatives",
    "similarity_preserving",
    "soft_target_kl",
    "sparse_token_divergence",
    "token_cross_entropy",
    "sparse_soft_target_kl",
    "token_divergence",
    "token_forward_kl",
    "token_generalized_jsd",
    "token_reverse_kl",
    "token_total_variation",
    "token_weights",
    "sampled_log_probs",
    "topk_log_probs",
    "variational_information",
]
