"""The prompts of LLaVA's instruction-data generation (Liu et al., 2023, "Visual Instruction
Tuning", Section 3 and the appendix).

- The conversation system message is the paper's (its appendix's prompt-construction
  table; also on the "Instruction-Tuning Data Generation" page of the authors' slides).
- The detailed-description and complex-reasoning system messages are written here from the
  paper's description of those response types (the paper prints only the conversation one).
- `DETAIL_INSTRUCTIONS` are the 16 "describe the image in detail" instructions of the paper's
  appendix (Table 9), one drawn at random per sample.
- `BRIEF_INSTRUCTIONS` are the 11 brief-description instructions of the appendix (Table 8),
  used for the caption (pre-training) samples `filter-captions` writes.
"""

from __future__ import annotations

CONVERSATION_SYSTEM = """You are an AI visual assistant, and you are seeing a single image. \
What you see are provided with five sentences, describing the same image you are looking at. \
Answer all questions as you are seeing the image.

Design a conversation between you and a person asking about this photo. The answers should be \
in a tone that a visual AI assistant is seeing the image and answering the question. Ask \
diverse questions and give corresponding answers.

Include questions asking about the visual content of the image, including the object types, \
counting the objects, object actions, object locations, relative positions between objects, \
etc. Only include questions that have definite answers:
(1) one can see the content in the image that the question asks about and can answer \
confidently;
(2) one can determine confidently from the image that it is not in the image. Do not ask any \
question that cannot be answered confidently.

Also include complex questions that are relevant to the content in the image, for example, \
asking about background knowledge of the objects in the image, asking to discuss about events \
happening in the image, etc. Again, do not ask about uncertain details. Provide detailed \
answers when answering complex questions. For example, give detailed examples or reasoning \
steps to make the content more convincing and well-organized. You can include multiple \
paragraphs if necessary."""

_BOXES = """Object locations in the image are also given, one per line, as \
`category: [x1, y1, x2, y2]`: a bounding box with coordinates between 0 and 1, (x1, y1) its \
top-left and (x2, y2) its bottom-right corner."""

DETAIL_SYSTEM = f"""You are an AI visual assistant looking at a single image. You are given \
five sentences that each describe the image. {_BOXES}

Using this information, write a rich and thorough description of the image, as if you were \
seeing it yourself: the scene, the objects, their attributes, counts and positions relative \
to each other, and what is happening. Do not mention the sentences or the coordinates, and do \
not describe anything you cannot confidently infer from them."""

COMPLEX_SYSTEM = f"""You are an AI visual assistant looking at a single image. You are given \
five sentences that each describe the image. {_BOXES}

Create one question about the image that needs reasoning to answer, beyond describing what is \
visible: for example the purpose of an object, what might happen next, why people are doing \
something, or background knowledge the scene calls for. Then answer it in detail, with clear \
step-by-step reasoning grounded in the content of the image, as if you were seeing it. Do not \
mention the sentences or the coordinates.

Write it as:
Question:
<the question>
===
Answer:
<the answer>"""

DETAIL_INSTRUCTIONS = (
    "Describe the following image in detail",
    "Provide a detailed description of the given image",
    "Give an elaborate explanation of the image you see",
    "Share a comprehensive rundown of the presented image",
    "Offer a thorough analysis of the image",
    "Explain the various aspects of the image before you",
    "Clarify the contents of the displayed image with great detail",
    "Characterize the image using a well-detailed description",
    "Break down the elements of the image in a detailed manner",
    "Walk through the important details of the image",
    "Portray the image with a rich, descriptive narrative",
    "Narrate the contents of the image with precision",
    "Analyze the image in a comprehensive and detailed manner",
    "Illustrate the image through a descriptive explanation",
    "Examine the image closely and share its details",
    "Write an exhaustive depiction of the given image",
)

BRIEF_INSTRUCTIONS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)

# One worked example per type, used when no --few-shot directory is given (ours).
_EXAMPLE_CONTEXT = """A man rides a bicycle down a city street.
A cyclist in a red jacket passes parked cars.
A person on a bike on a street lined with shops.
A man cycling past a row of cars on a sunny day.
A bicyclist riding along an urban road.

person: [0.412, 0.305, 0.566, 0.842]
bicycle: [0.398, 0.551, 0.590, 0.937]
car: [0.000, 0.540, 0.301, 0.803]
car: [0.688, 0.562, 1.000, 0.861]"""

EXAMPLES = {
    "conversation": (
        _EXAMPLE_CONTEXT.split("\n\n")[0],
        """Question:
What is the man in the image doing?
===
Answer:
The man is riding a bicycle down a city street, passing cars parked along the road.
===
Question:
What color is the cyclist's jacket?
===
Answer:
The cyclist is wearing a red jacket.
===
Question:
Why might someone choose a bicycle for getting around a city like this?
===
Answer:
A bicycle is a practical way to move through a city: it avoids traffic jams and the search \
for parking, costs little to run, and gives some exercise. On a sunny day like this one, with \
shops lining the street, it also makes it easy to stop along the way.""",
    ),
    "detail": (
        _EXAMPLE_CONTEXT,
        """The image shows a sunny city street lined with shops. In the middle of the scene, \
a man in a red jacket rides a bicycle along the road. Cars are parked on both sides of him: \
one on the left edge of the picture and another on the right, framing the cyclist as he \
passes between them.""",
    ),
    "complex": (
        _EXAMPLE_CONTEXT,
        """Question:
What should the cyclist watch out for while riding past the parked cars?
===
Answer:
Riding between parked cars, the cyclist should watch for car doors that open suddenly into \
his path, a common danger for people on bicycles. He should also keep an eye on cars pulling \
out of their spots and on pedestrians stepping out between vehicles to cross the street. \
Keeping a door's width away from the parked cars and riding at a moderate speed gives him \
time to react.""",
    ),
}

SYSTEM_MESSAGES = {
    "conversation": CONVERSATION_SYSTEM,
    "detail": DETAIL_SYSTEM,
    "complex": COMPLEX_SYSTEM,
}
