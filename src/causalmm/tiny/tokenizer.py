"""The tiny tokenizers: a byte-level BPE trained on a small built-in English corpus, per a family's
:class:`TokenizerSpec` (special tokens, bos behaviour, chat template)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["LLAVA_SPECIALS", "QWEN_EXTRA", "QWEN_SPECIALS", "TokenizerSpec", "train_tokenizer"]

# A small English corpus: enough for a few hundred byte-level BPE merges, so ordinary prompts tokenize into
# word-ish pieces (as with a real tokenizer) instead of single bytes.  Byte-level BPE round-trips any text
# regardless; the corpus only shapes how compact the encoding is.
_CORPUS: tuple[str, ...] = (
    "Is there a cat in the image? Answer yes or no.",
    "Is there a dog in the image? Answer yes or no.",
    "Is there a person in the picture? Please answer yes or no.",
    "Yes, there is a cat sitting on the red sofa.",
    "No, there is no dog in this image.",
    "Describe the image in detail.",
    "Please describe this picture in as much detail as you can.",
    "What is the color of the car? The car is red.",
    "What color is the sky? The sky is blue and the clouds are white.",
    "The image shows a small brown dog playing with a green ball on the grass.",
    "A black cat is sleeping next to a white cup on the wooden table.",
    "There are two people walking along the street near a yellow bus.",
    "The man is holding an umbrella because it is raining.",
    "A woman is riding a bicycle in the park under the trees.",
    "How many apples are on the plate? There are three apples.",
    "The kitchen has a sink, a window, and an orange chair.",
    "Is the light on? Yes, the lamp is on.",
    "Is the door open? No, the door is closed.",
    "What animal is in the photo? It is a horse standing in a field.",
    "The bird on the fence is small and gray.",
    "Can you see a clock on the wall? Yes, the clock shows ten o'clock.",
    "Describe the colors: red, green, blue, yellow, black, white, brown, pink, purple, and gray.",
    "The boy is wearing a blue shirt and the girl is wearing a pink dress.",
    "A plate of food with bread, cheese, and fruit is on the table.",
    "You are a helpful assistant.",
    "The user asks a question and the assistant gives a short answer.",
    "There is a laptop, a phone, and a book on the desk.",
    "The train is at the station and many people are waiting.",
    "Is there a boat on the water? Yes, there is a white boat.",
    "Is there a giraffe in the image? No, there is not.",
    "What is on the left side of the image? A tree is on the left.",
    "What is on the right side of the image? A house is on the right.",
    "The picture was taken at night, so the image is dark.",
    "This is a photo of a beach with sand, waves, and a bright sun.",
    "Answer the question using a single word or phrase.",
    "The snow covers the mountains and the road.",
    "Two cats and one dog are lying on the floor together.",
    "The sign says stop, and the car has stopped.",
    "Look at the image carefully before you answer.",
    "I think the answer is yes, but I am not sure.",
    # Chat-template scaffolding, so role names become single tokens as in real tokenizers.
    "USER: Is there a cat in the image? ASSISTANT: Yes.",
    "USER: Describe the image. ASSISTANT: A dog is on the grass.",
    "USER: What color is the car? ASSISTANT: Red.",
    "system\nYou are a helpful assistant.",
    "user\nIs there a dog in the image?",
    "assistant\nNo, there is a cat.",
    "system\nAnswer the question.",
    "user\nDescribe the picture.",
    "assistant\nThe picture shows a dog.",
)

_VOCAB_SIZE = 512

# The two special-token sets most families reuse, in the order they get the lowest ids.  LLaVA(-NeXT) mimics
# llava-hf's Llama tokenizer (<s>, </s>, <unk>, <pad>); Qwen mimics Qwen2-VL's (no bos/unk in the real one; we
# use <|endoftext|> as bos/unk so that every id in the configs is defined).
LLAVA_SPECIALS: dict[str, str] = {
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
}
QWEN_SPECIALS: dict[str, str] = {
    "unk_token": "<|endoftext|>",
    "bos_token": "<|endoftext|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
}
#: Qwen-VL's chat-turn and vision markers.
QWEN_EXTRA: tuple[str, ...] = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


@dataclass(frozen=True)
class TokenizerSpec:
    """A family's tokenizer facts: special tokens, extra tokens, bos behaviour and chat template.

    ``named`` are model-specific special tokens the processor reads as attributes (``tokenizer.image_token``,
    ``tokenizer.boi_token``...); ``extra`` are further special tokens (chat-turn markers and the like).
    """

    specials: dict[str, str]
    extra: tuple[str, ...]
    chat_template: str
    add_bos: bool = True
    named: dict[str, str] = field(default_factory=dict)
    #: extra training lines (the family's chat scaffolding), so role names become single tokens
    corpus: tuple[str, ...] = ()


def train_tokenizer(spec: TokenizerSpec) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer with ``spec``'s special tokens and chat template.

    Byte-level BPE is used (rather than a word-level vocabulary) so that *any* prompt a test writes
    round-trips exactly, never producing ``<unk>``.  Training is deterministic for a fixed corpus.
    """
    ordered_specials = list(dict.fromkeys([*spec.specials.values(), *spec.extra, *spec.named.values()]))

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=ordered_specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS + spec.corpus, trainer=trainer)

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        extra_special_tokens=list(spec.extra),
        add_bos_token=spec.add_bos,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        # Left padding by default: these models are used for batched generation.
        padding_side="left",
        model_max_length=2048,
        chat_template=spec.chat_template,
        **spec.specials,
        **spec.named,
    )
