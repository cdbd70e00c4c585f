"""A deterministic, SimpleStories-like corpus for offline language-model work.

No SimpleStories or TinyStories text is available offline, so tests and demos train their tiny
language models on stories from this grammar instead. Each story draws a cast (a hero with a
name, pronouns, kind and trait; a friend; a helper), props, a place and one of six arcs (a quest,
a lost thing, a new friend, learning a skill, a trip, sharing), then fills sentence templates that
include dialogue. The word lists are wide (about 2.8k distinct words, hundreds of them compounds of
shared roots) so that a 4096-token BPE vocabulary gets used.

`build_story_corpus(out_dir, n_train, n_test, seed)` writes `train.jsonl` and `test.jsonl` with a
`story` column (the column name of `SimpleStories/SimpleStories`), so
`datasets.load_dataset(out_dir)` loads it exactly like the hub dataset. One `random.Random(seed)`
drives everything: the same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from spd_ray.io import write_text


def _words(text: str) -> list[str]:
    """Split on '|' if present (multi-word entries), else on whitespace; drop duplicates."""
    items = text.split("|") if "|" in text else text.split()
    return list(dict.fromkeys(s.strip() for s in items if s.strip()))


GIRL_NAMES = _words(
    "Mia Lily Zoe Emma Ava Ella Grace Ruby Rosa Nora Hazel Ivy Luna Stella Clara Alice Maya Anna "
    "Lucy Sara Chloe Daisy Iris Jade Lena Mila Nina Olive Pearl Poppy Quinn Rita Sophie Tess Vera "
    "Willa Yara Zara Abby Bella Cora Dora Eva Faye Gemma Hanna Isla June Kira Lola Maisie Nell "
    "Opal Penny Rose Sadie Tilly Wren Amber Beth Cleo Della Edie Flora Greta Holly Ingrid Josie "
    "Kate Leah Molly Nadia Orla Pia Remy Talia Violet Wendy Yasmin Zelda Alma Bonnie Dina Elsie "
    "Fern Gwen Hope Imogen Jenna Kitty Lottie Mabel Naomi Paige Rhea Suki Tara Ada Briar Celia "
    "Esme Freya Gina Heidi Ines Joy Lucia Marnie Nola Polly Romy Sasha Thea Viola Hattie Elodie "
    "Agnes"
)
BOY_NAMES = _words(
    "Leo Sam Max Ben Tom Jack Finn Kai Noah Owen Eli Theo Hugo Luke Milo Oscar Ryan Toby Adam Ned "
    "Arlo Basil Cole Dan Ezra Felix Gus Hank Ivan Joel Kit Liam Mark Nico Otis Pete Rex Seth Tim "
    "Vince Wes Zack Abe Bram Carl Dex Emil Fred George Harry Ian Jonah Karl Levi Nate Ollie Paul "
    "Ray Simon Teddy Victor Walt Yusuf Zeke Alfie Bruno Caleb Dylan Elliot Frank Gabe Henry Isaac "
    "Jasper Kevin Louis Marco Neil Omar Percy Ronan Silas Tyler Will Alec Barney Colin Drew Ethan "
    "Glen Hal Jay Lars Matt Otto Rufus Stan Ted Abel Boris Cyril Duncan Edgar Fergus Gideon Hector "
    "Jude Kenji Lionel Monty Nigel Orson Quincy Ralph Sid Tobias Wally Benny Chester Dennis Rory"
)
ANIMALS = _words(
    "rabbit cat fox duck dog mouse owl turtle bee frog bear deer goat horse pig cow sheep lamb hen "
    "chick goose swan robin sparrow crow parrot penguin puffin seal otter beaver badger hedgehog "
    "squirrel chipmunk raccoon skunk mole rat hamster kitten puppy pony donkey camel llama zebra "
    "giraffe lion tiger leopard cheetah panda koala kangaroo monkey gorilla elephant hippo rhino "
    "crocodile lizard snake snail worm ant beetle ladybug butterfly moth dragonfly cricket spider "
    "crab lobster octopus whale dolphin shark starfish jellyfish salmon goldfish bat wolf moose "
    "bison ferret weasel stork heron pelican flamingo peacock toucan eagle hawk falcon magpie wren "
    "finch lark dove pigeon gull walrus yak buffalo gecko newt toad tadpole caterpillar bunny emu "
    "ostrich lemur sloth armadillo porcupine possum mule calf foal piglet duckling cub fawn"
)
CREATURES = {
    "she": _words("fairy princess mermaid witch queen robot dragon pixie giant elf"),
    "he": _words("prince wizard knight king robot dragon pixie giant elf goblin"),
}
TRAITS = _words(
    "brave shy curious kind clever gentle quiet cheerful playful silly careful busy helpful honest "
    "lazy bold proud polite friendly grumpy sleepy lively jolly patient eager smart wise funny "
    "noisy tidy messy sweet calm little young tiny clumsy daring dreamy fearless generous hopeful "
    "humble loyal lucky merry nervous nimble plucky restless thoughtful timid trusty witty zany "
    "bouncy chatty cheeky fussy"
)
COLORS = _words(
    "red blue green yellow orange purple pink brown black white gray golden silver violet teal "
    "crimson scarlet amber ivory navy lilac maroon turquoise indigo copper bronze cream lemon mint "
    "coral peach emerald"
)
ADJECTIVES = _words(
    "big small tiny huge giant little tall short long round square flat thick thin wide heavy "
    "light soft hard smooth rough fluffy fuzzy furry shiny sparkly bright dark dull shaggy bumpy "
    "crinkly silky squishy sticky slippery spotted striped wooden rusty dusty muddy sandy frosty "
    "old new broken magic secret special strange lovely pretty plain fancy warm cold clean dirty "
    "empty full cozy gentle happy sleepy grumpy noisy quiet speckled wobbly twisty glowing"
)
OBJECTS = _words(
    "ball kite key letter book hat cap scarf boot shoe sock glove mitten coat jacket sweater "
    "umbrella bag basket box bucket bottle cup mug bowl plate spoon pan pot kettle jar lamp "
    "lantern candle clock watch bell drum flute whistle violin guitar piano trumpet harp horn "
    "ribbon button marble coin ring necklace bracelet crown wand shell stone pebble feather flower "
    "tulip seed acorn pinecone stick rope net map compass telescope puzzle block doll train truck "
    "car boat ship plane rocket bike wagon sled skateboard ladder hammer brush broom shovel rake "
    "crayon pencil notebook envelope stamp card ticket balloon blanket pillow quilt rug chair "
    "bench tent flag mirror wheel cart barrel pail sack cushion jewel gem crystal trophy medal "
    "badge helmet mask cape apron belt camera radio teapot paintbrush toolbox jigsaw rattle "
    "pinwheel yoyo"
)
COUNT_FOODS = _words(
    "apple pear plum peach cherry grape berry banana lemon melon mango carrot pea bean potato "
    "tomato pumpkin onion radish turnip cabbage cucumber pepper mushroom walnut almond peanut "
    "cookie cake pie muffin cupcake biscuit cracker pancake waffle donut bun sandwich pizza "
    "pretzel lollipop strawberry blueberry raspberry apricot coconut pineapple dumpling"
)
MASS_FOODS = {
    "bowl": _words("soup stew rice porridge cereal noodles yogurt pudding popcorn salad"),
    "cup": _words("milk juice tea cocoa lemonade water"),
    "jar": _words("honey jam jelly pickles"),
    "slice": _words("bread cheese toast melon"),
}
PLACE_ADJ = _words(
    "small quiet busy sunny snowy sleepy tiny green windy hidden cozy old peaceful friendly "
    "colorful misty sandy rocky leafy bright happy faraway lonely magical"
)
PLACE_NOUNS = _words(
    "village town city farm forest wood jungle desert island valley meadow garden park school "
    "castle palace cottage house bakery library museum zoo market harbor beach lake pond mountain "
    "hill cave swamp orchard treehouse lighthouse kingdom camp playground street burrow nest"
)
SPOTS = _words(
    "by the sea|at the end of the road|near a tall hill|high in the clouds|deep in the woods|"
    "next to a river|under a big sky|far from the city|on a green hill|beside a quiet lake|"
    "behind a row of pines|at the edge of the forest|between two mountains|across the bay|"
    "past the old mill|on a windy cliff|in a sunny valley|near the border of the map|"
    "under a rainbow|over the rolling hills|at the foot of a volcano|by a sparkling waterfall"
)
TOWN_ROOTS = _words(
    "Willow Maple Oak Pine Fern Clover Amber Silver Honey Misty Rose Stone River Sunny Brook "
    "Meadow Fox Bramble Hazel Birch Cedar Elder Golden Holly Juniper Lark Moss Nettle Pebble "
    "Thistle Wren Ash Berry Cherry Copper Daisy Ivy Marsh Apple Button Candle Frost Acorn Badger "
    "Otter Robin Lantern Kettle Puddle Bluebell Cobble Dandelion Ember Fiddle Ginger Heather "
    "Jasmine Kestrel Lavender Marigold Nutmeg Pepper Quill Raven Saffron Tumble Velvet Whistle "
    "Yarrow Hollow Cinder Fable Glimmer Harvest Primrose Snowdrop Sorrel Starling Tansy Bracken"
)
TOWN_SUFFIXES = _words(
    "brook dale field ford wood ton vale hill shire bury mere holm stead wick port gate moor well "
    "cliff haven bridge ridge"
)
LANDMARKS = _words(
    "old oak|pond|fence|bridge|well|barn|garden|bakery|fountain|big rock|river|mill|gate|hill|"
    "school|playground|shop|market|library|beach|dock|tower|cave|lighthouse|haystack|orchard|"
    "meadow|hedge|stream|path|tree stump|swing|sandbox|pier|field|windmill|greenhouse|bus stop|"
    "post office|station|stable|henhouse|shed|attic|kitchen|porch|cellar|pumpkin patch|waterfall"
)
HELPERS = _words(
    "baker farmer teacher grandma grandpa nurse doctor fisherman gardener painter singer postman "
    "sailor pilot firefighter librarian neighbor uncle aunt cousin shepherd miller potter tailor "
    "carpenter cook clown juggler zookeeper ranger beekeeper shopkeeper woodcutter owl tortoise "
    "beaver elephant grasshopper"
)
HELPER_ADJ = _words(
    "kind wise old friendly cheerful gentle tall busy jolly patient clever quiet helpful smiling"
)
# (base, past, -ing) for every verb a template uses; -ing forms also describe side scenes.
VERBS = [
    tuple(v.split())
    for v in _words(
        "run ran running|swim swam swimming|hop hopped hopping|skip skipped skipping|"
        "walk walked walking|march marched marching|dash dashed dashing|hurry hurried hurrying|"
        "wander wandered wandering|tiptoe tiptoed tiptoeing|race raced racing|zoom zoomed zooming|"
        "waddle waddled waddling|trot trotted trotting|gallop galloped galloping|fly flew flying|"
        "climb climbed climbing|crawl crawled crawling|slide slid sliding|roll rolled rolling|"
        "jog jogged jogging|stomp stomped stomping|bounce bounced bouncing|paddle paddled paddling|"
        "sleep slept sleeping|dance danced dancing|sing sang singing|dig dug digging|"
        "hum hummed humming|laugh laughed laughing|play played playing|splash splashed splashing|"
        "nap napped napping|eat ate eating|read read reading|draw drew drawing|"
        "paint painted painting|spin spun spinning|wave waved waving|whistle whistled whistling|"
        "juggle juggled juggling|knit knitted knitting|fish fished fishing|sail sailed sailing|"
        "float floated floating|buzz buzzed buzzing|chirp chirped chirping|snore snored snoring|"
        "sneeze sneezed sneezing|giggle giggled giggling|yawn yawned yawning|"
        "stretch stretched stretching|rest rested resting|sit sat sitting|hide hid hiding|"
        "peek peeked peeking|munch munched munching|nibble nibbled nibbling|build built building|"
        "bake baked baking|find found finding|plant planted planting|win won winning|"
        "make made making|fix fixed fixing|help helped helping|carry carried carrying|"
        "look looked looking|search searched searching|call called calling|shout shouted shouting|"
        "whisper whispered whispering|smile smiled smiling|nod nodded nodding|cry cried crying|"
        "sigh sighed sighing|think thought thinking|try tried trying|practice practiced practicing|"
        "fall fell falling|wobble wobbled wobbling|share shared sharing|give gave giving|"
        "take took taking|bring brought bringing|see saw seeing|hear heard hearing|"
        "pick picked picking|hold held holding|hug hugged hugging|thank thanked thanking|"
        "learn learned learning|teach taught teaching|show showed showing|tell told telling|"
        "count counted counting|clap clapped clapping|cheer cheered cheering|open opened opening|"
        "close closed closing|fold folded folding|wrap wrapped wrapping|sweep swept sweeping|"
        "scrub scrubbed scrubbing|water watered watering|feed fed feeding|pack packed packing|"
        "ride rode riding|row rowed rowing|skate skated skating|throw threw throwing|"
        "catch caught catching|kick kicked kicking|chase chased chasing|follow followed following|"
        "listen listened listening|explore explored exploring|visit visited visiting|"
        "wish wished wishing|hope hoped hoping|dream dreamed dreaming|wonder wondered wondering|"
        "glow glowed glowing|shine shone shining|sparkle sparkled sparkling|twirl twirled twirling|"
        "flutter fluttered fluttering|drift drifted drifting|tumble tumbled tumbling|"
        "scamper scampered scampering|scurry scurried scurrying|leap leapt leaping|"
        "sniff sniffed sniffing|scratch scratched scratching|tap tapped tapping|"
        "knock knocked knocking"
    )
]
_VERB = {v[0]: v for v in VERBS}
MOTION = _words(
    "run hop skip walk march dash hurry wander tiptoe race zoom waddle trot gallop jog stomp "
    "bounce scamper scurry leap"
)
PASTIMES = _words(
    "sleep dance sing dig hum laugh play splash nap eat read draw paint spin wave whistle juggle "
    "knit fish float buzz chirp snore sneeze giggle yawn stretch rest sit hide peek munch nibble "
    "twirl flutter drift tumble sniff scratch tap swim roll slide climb"
)
STRUCTURES = _words(
    "sandcastle snowman fort birdhouse tower raft nest swing treehouse bridge kite sled cart "
    "scarecrow puppet"
)
SKILLS = _words(
    "ride a bike|swim|whistle|juggle|skate|dance|sing a song|read a big book|write a poem|"
    "fly a kite|tie a knot|play the drum|play the flute|play the violin|play the piano|bake bread|"
    "catch a fish|row a boat|knit a scarf|draw a horse|jump rope|climb a tree|count to a hundred|"
    "do a cartwheel|build a snowman|paint a sunset|whistle a tune|plant a garden|make a kite|"
    "sail a boat|ice skate|speak softly|tell a joke|do a magic trick"
)
SOUNDS = _words(
    "bang squeak peep rumble crack tap honk whimper chirp howl splash crash thump buzz hiss creak "
    "jingle rustle whoosh click ding pop roar purr quack moo oink meow woof hoot tweet croak"
)
SOUND_ADJ = _words("loud soft tiny low sharp gentle funny sad happy long strange sudden")
WEATHER = _words(
    "The sun was shining.|The sky was gray and soft.|A cool wind blew through the trees.|"
    "Snow fell quietly on the roofs.|Rain tapped on the windows.|The air smelled like flowers.|"
    "Big white clouds floated by.|The stars were bright that night.|Fog covered the fields.|"
    "Leaves danced in the wind.|A rainbow stretched across the sky.|The morning was very still."
)
SEASONS = _words("spring summer autumn winter")
TIMES = _words("morning day afternoon evening night")
TIME_ADJ = _words(
    "cold bright windy rainy sunny foggy snowy warm cloudy crisp chilly stormy lazy quiet"
)
OPENERS = _words(
    "Once upon a time|One day|Long ago|Not so long ago|One bright morning|In a land far away|"
    "Many years ago|One sunny afternoon|Once"
)
HAPPY = _words(
    "happy proud glad cheerful joyful calm safe thankful excited brave strong hopeful peaceful "
    "delighted grateful cozy loved relieved content lucky jolly merry thrilled bold free"
)
SAD = _words(
    "sad worried tired lonely upset scared angry grumpy confused nervous sorry cross gloomy afraid "
    "frightened uneasy cranky hungry cold lost unhappy jealous bored puzzled"
)
CONNECTIVES = _words("But|Then|Suddenly,|Soon|All at once,|Just then,|After a while,")
NUMBERS = _words("two three four five six seven eight nine ten many")
MORALS = _words(
    "It is good to ask for help.|Friends make hard things easy.|Sharing makes everyone happy.|"
    "Never give up on your dreams.|Kindness is a kind of magic.|Every small step counts.|"
    "It is brave to try again.|Listening is a gift.|Home is where your friends are.|"
    "Being different is a good thing.|A smile can change a day.|Patience helps things grow."
)

_AN_EXCEPTIONS = ("uni", "use", "euro")


def a(word: str) -> str:
    """'a word' or 'an word' by the first letter (with the usual 'uni-' exceptions)."""
    lower = word.lower()
    vowel = lower[0] in "aeiou" and not lower.startswith(_AN_EXCEPTIONS)
    return f"{'an' if vowel else 'a'} {word}"


_PLURAL_EXCEPTIONS = {
    "mouse": "mice",
    "goose": "geese",
    "sheep": "sheep",
    "deer": "deer",
    "fish": "fish",
    "moose": "moose",
    "bison": "bison",
    "salmon": "salmon",
    "wolf": "wolves",
    "calf": "calves",
    "potato": "potatoes",
    "tomato": "tomatoes",
    "mango": "mangoes",
    "hippo": "hippos",
}


def plural(noun: str) -> str:
    if noun in _PLURAL_EXCEPTIONS:
        return _PLURAL_EXCEPTIONS[noun]
    if noun.endswith(("s", "x", "ch", "sh", "z")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def town_names() -> list[str]:
    return [root + suffix for root in TOWN_ROOTS for suffix in TOWN_SUFFIXES]


_TOWNS = town_names()
FAMILY = _words("mom|dad|grandma|grandpa|big sister|little brother|aunt|uncle|family|neighbors")
FAILS = _words(
    "fell down|wobbled and tipped over|got all mixed up|made a funny noise|dropped everything|"
    "went the wrong way|tangled everything up|slipped and sat in the mud"
)
FOUND_AT = _words(
    "under a pile of leaves|next to a sleeping {animal}|inside an old boot|behind {a_adj} box|"
    "on top of the {landmark}|in the pocket of {pos} coat|under {pos} own bed|in the tall grass"
)
GOALS = (
    ("find {a_thing}", "found {a_thing}"),
    ("build {a_adj} {structure}", "built {a_adj} {structure}"),
    ("bake {a_food} for {pos} {family}", "baked {a_food} for {pos} {family}"),
    ("learn to {skill}", "learned to {skill}"),
    ("win the {color} ribbon at the fair", "won the {color} ribbon at the fair"),
    ("climb the tallest hill in {town}", "climbed the tallest hill in {town}"),
    ("paint a picture of {a_animal}", "painted a picture of {a_animal}"),
    ("plant {number} {food} seeds", "planted {number} {food} seeds"),
    ("see the {color} {animal} of {town}", "saw the {color} {animal} of {town}"),
    ("make a gift for {pos} {family}", "made a gift for {pos} {family}"),
    ("visit the {landmark} in {town}", "visited the {landmark} in {town}"),
    ("sing in the {town} show", "sang in the {town} show"),
)
PROBLEMS = _words(
    "a loud storm made the lights go out|the bridge over the river was broken|"
    "{pos} {thing} was lost in the tall grass|a big {animal} sat in the middle of the path|"
    "the path was covered in {adj} mud|it started to rain very hard|"
    "{pos} {thing} fell into the {landmark}|{sub} could not reach the top shelf|"
    "the wind blew {pos} {thing} up into a tree|{sub} got lost near the {landmark}|"
    "the gate of the {landmark} was locked|a thick fog rolled in and {sub} could not see|"
    "{sub} tripped on a root and hurt {pos} knee|the {food} fell on the floor"
)
HELP_ACTS = _words(
    "held a lamp so {sub} could see|showed {obj} a secret path|lifted the {thing} down for {obj}|"
    "fixed the bridge with {a_adj} plank|gave {obj} {a_food} to feel better|"
    "told {obj} a funny story|helped {obj} look behind the {landmark}|lent {obj} {a_thing}|"
    'sang a soft song until {sub} felt {happy}|said, "You can do it."|'
    'said, "Do not be afraid."|said, "Take a deep breath and try again."'
)
TIPS = _words(
    'showed {obj} how to start slowly|said, "Try a little every day."|'
    'said, "Everyone falls at first."|showed {obj} a clever trick|'
    'practiced with {obj} all afternoon|said, "Watch me, then you try."'
)
DIALOGUE = _words(
    '"I will not give up," {sub} said.|"What {a_adj} day!" said {N}.|'
    '"Can I really do it?" {N} wondered.|"Let us go!" {N} shouted.|'
    '"I hope I can {goal}," {sub} whispered.|"This will be fun," {N} told {pos} {family}.|'
    '"Look at that {animal}!" {N} said with a laugh.'
)
ENDINGS = _words(
    "That night, {N} went to sleep with a smile.|Everyone in {town} cheered for {N}.|"
    "{N} knew that this was the best day ever.|{Sub} could not wait for the next adventure.|"
    "And {N} lived happily in {town} for a long, long time.|"
    "Later, {N} told the story to {pos} {family}, who smiled and listened.|"
    "From that day on, {N} and {F} were best friends."
)
SIDE_SCENES = _words(
    "On the way, {N} saw {a_adj} {animal} {ing} near the {landmark}.|"
    "{N} passed {number} {animals} {ing} by the {landmark}.|"
    "Near the {landmark}, {a_animal} was {ing} all by itself.|"
    "{Sub} heard {a_sound_adj} {sound} from the {landmark}. It was only {a_animal} {ing}."
)


class _Fillers(dict[str, str]):
    """Template fields: the story's fixed cast, plus random words drawn only when a template asks
    for them (in the template's left-to-right order, so the stream stays deterministic)."""

    def __init__(self, story: _Story, extra: dict[str, str]):
        super().__init__(story.fixed, **extra)
        self.rng = story.rng

    def __missing__(self, key: str) -> str:
        r = self.rng
        match key:
            case "Sub" | "Pos":
                return self[key.lower()].capitalize()
            case "animal":
                return r.choice(ANIMALS)
            case "a_animal":
                return a(r.choice(ANIMALS))
            case "animals":
                return plural(r.choice(ANIMALS))
            case "adj":
                return r.choice(ADJECTIVES)
            case "a_adj":
                return a(r.choice(ADJECTIVES))
            case "color":
                return r.choice(COLORS)
            case "food":
                return r.choice(COUNT_FOODS)
            case "a_food":
                if r.random() < 0.6:
                    return a(r.choice(COUNT_FOODS))
                container = r.choice(list(MASS_FOODS))
                return f"a {container} of {r.choice(MASS_FOODS[container])}"
            case "foods":
                return plural(r.choice(COUNT_FOODS))
            case "ing":
                return _VERB[r.choice(PASTIMES)][2]
            case "a_sound_adj":
                return a(r.choice(SOUND_ADJ))
        table = {
            "landmark": LANDMARKS,
            "structure": STRUCTURES,
            "skill": SKILLS,
            "family": FAMILY,
            "number": NUMBERS,
            "sound": SOUNDS,
            "happy": HAPPY,
            "sad": SAD,
        }
        if key not in table:
            raise KeyError(f"story template field {key!r} is not defined")
        return r.choice(table[key])


class _Story:
    """One story's cast and props; `say` fills a template with them (and fresh random words)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        g = rng.choice(("she", "he"))
        fg = rng.choice(("she", "he"))
        name = rng.choice(GIRL_NAMES if g == "she" else BOY_NAMES)
        friend_pool = [n for n in (GIRL_NAMES if fg == "she" else BOY_NAMES) if n != name]
        kind_pool = ["girl" if g == "she" else "boy"] * 8 + ANIMALS + CREATURES[g]
        self.kind = rng.choice(kind_pool)
        self.trait = rng.choice(TRAITS)
        self.helper = f"{rng.choice(HELPER_ADJ)} {rng.choice(HELPERS)}"
        thing = f"{rng.choice(COLORS + ADJECTIVES)} {rng.choice(OBJECTS)}"
        town = rng.choice(_TOWNS)
        self.fixed = {
            "N": name,
            "sub": g,
            "obj": "her" if g == "she" else "him",
            "pos": "her" if g == "she" else "his",
            "F": rng.choice(friend_pool),
            "fkind": rng.choice(ANIMALS),
            "fsub": fg,
            "fobj": "her" if fg == "she" else "him",
            "thing": thing,
            "a_thing": a(thing),
            "town": town,
            "h": self.helper.split()[-1],
        }
        goal = rng.choice(GOALS)
        self.fixed["goal"], self.goal_past = self.fill(goal[0]), goal[1]
        if rng.random() < 0.5:
            self.place = f"the {rng.choice(('village', 'town'))} of {town}"
        else:
            self.place = f"{a(rng.choice(PLACE_ADJ))} {rng.choice(PLACE_NOUNS)} {rng.choice(SPOTS)}"

    def fill(self, template: str, **extra: str) -> str:
        return template.format_map(_Fillers(self, extra))

    def say(self, template: str, **extra: str) -> str:
        """A sentence: the filled template with its first letter capitalized."""
        text = self.fill(template, **extra)
        return text[0].upper() + text[1:]

    def pick(self, options: list[str], **extra: str) -> str:
        return self.say(self.rng.choice(options), **extra)

    def verb(self, pool: list[str], form: int) -> str:
        return _VERB[self.rng.choice(pool)][form]


def _intro(s: _Story) -> list[str]:
    r = s.rng
    out = [
        f"{r.choice(OPENERS)}, in {s.place}, there lived {a(s.trait)} {s.kind} named "
        + s.fill("{N}.")
    ]
    if r.random() < 0.6:
        if r.random() < 0.5:
            out.append(r.choice(WEATHER))
        else:
            when = f"{r.choice(TIME_ADJ)} {r.choice(SEASONS)} {r.choice(TIMES)}"
            out.append(f"It was {a(when)}.")
    if r.random() < 0.5:
        out.append(s.say("{N} loved to {x} and {y}.", x=s.verb(PASTIMES, 0), y=s.verb(PASTIMES, 0)))
    if r.random() < 0.3:
        out.append(s.say("{Sub} always carried {a_thing} everywhere."))
    return out


def _problems(s: _Story) -> list[str]:
    out = []
    for _ in range(s.rng.choice((1, 1, 2))):
        out.append(f"{s.rng.choice(CONNECTIVES)} {s.fill(s.rng.choice(PROBLEMS))}.")
        if s.rng.random() < 0.4:
            out.append(s.say("{N} felt {sad}."))
    return out


def _helper_comes(s: _Story, acts: list[str]) -> list[str]:
    when = s.rng.choice(("Just then", "After a while", "Luckily", "At that moment"))
    act = s.fill(s.rng.choice(acts))
    return [f"{when}, {a(s.helper)} came by.", s.say("The {h} ") + act + "."]


def _quest(s: _Story) -> list[str]:
    out = [s.say("{N} wanted to {goal}.")]
    out += [s.pick(SIDE_SCENES) for _ in range(s.rng.choice((0, 1, 1, 2)))]
    if s.rng.random() < 0.5:
        out.append(s.pick(DIALOGUE))
    out += _problems(s) + _helper_comes(s, HELP_ACTS)
    hope = s.rng.choice(("new hope", "a brave heart", "a little help", "a big smile"))
    out.append(s.say(f"With {hope}, {{N}} {s.goal_past}."))
    return out


def _lost(s: _Story) -> list[str]:
    out = [s.say("One {x}, {N} could not find {pos} {thing}.", x=s.rng.choice(TIMES))]
    for _ in range(s.rng.choice((2, 2, 3))):
        look = s.verb(["look", "search", "peek"], 1)
        out.append(s.say(f"{{Sub}} {look} near the {{landmark}}, but it was not there."))
    if s.rng.random() < 0.6:
        out.append(s.say("{N} felt {sad}."))
    out += [
        s.say("Then {F} the {fkind} {x} over.", x=s.verb(MOTION, 1)),
        s.say('"What is wrong?" asked {F}.'),
        s.say('"I lost my {thing}," said {N}.'),
        s.say('"Let me help you," said {F}.'),
        s.say("Together they searched, and there it was, {x}!", x=s.fill(s.rng.choice(FOUND_AT))),
        s.say('{N} hugged {F} and said, "Thank you!"'),
    ]
    return out


def _new_friend(s: _Story) -> list[str]:
    out = [
        s.say("{N} saw {x} sitting alone by the {landmark}.", x=a(s.fixed["fkind"])),
        s.say("The {fkind} looked {sad}."),
        s.say('"Hello, I am {N}. What is your name?" asked {N}.'),
        s.say('"My name is {F}," said the {fkind} {x}.', x=s.rng.choice(("softly", "shyly"))),
        s.say("{F} was new in {town} and had no friends yet."),
        s.say("{N} asked {F} to {x} with {obj}.", x=s.verb(PASTIMES, 0)),
    ]
    if s.rng.random() < 0.5:
        out += [s.say("But {F} did not know how to {skill}."), s.say("{N} showed {fobj} how.")]
    out += [
        s.say("Soon {F} was {x}.", x=s.rng.choice(("laughing", "smiling", "giggling"))),
        s.say("They {x} until the sun went down.", x=s.verb(PASTIMES, 1)),
    ]
    return out


def _learning(s: _Story) -> list[str]:
    skill = s.rng.choice(SKILLS)
    out = [
        s.say("{N} wanted to learn to {x}.", x=skill),
        s.say("The first time {sub} tried, {sub} {x}.", x=s.rng.choice(FAILS)),
    ]
    if s.rng.random() < 0.5:
        out.append(s.say("{N} felt {sad}, and {sub} almost gave up."))
    out += _helper_comes(s, TIPS)
    out += [
        s.say("So {N} practiced every {x}, near the {landmark}.", x=s.rng.choice(TIMES)),
        s.say("At last, {N} could {x}!", x=skill),
        s.say("{Sub} showed {pos} {family}, and they clapped."),
    ]
    return out


def _trip(s: _Story) -> list[str]:
    where = f"{a(s.rng.choice(PLACE_ADJ))} {s.rng.choice(PLACE_NOUNS)} {s.rng.choice(SPOTS)}"
    out = [
        s.say(
            "One {x} {y}, {N} and {pos} {family} went on a trip to ",
            x=s.rng.choice(SEASONS),
            y=s.rng.choice(TIMES),
        )
        + where
        + ".",
        s.say("They packed {a_food}, {a_thing}, and {x}.", x=a(s.rng.choice(OBJECTS))),
    ]
    out += [
        s.say("On the way, they saw {number} {animals} {ing}.") for _ in range(s.rng.randint(1, 2))
    ]
    out.append(s.say("{N} {x} and {y} all day.", x=s.verb(PASTIMES, 1), y=s.verb(PASTIMES, 1)))
    if s.rng.random() < 0.5:
        out += [
            s.say("Then {a_adj} {animal} {x} up and took {pos} {food}!", x=s.verb(MOTION, 1)),
            "Everyone laughed.",
        ]
    out += [
        s.say("When the sun went down, they went home."),
        s.say("{N} told {pos} friend {F} all about the trip."),
    ]
    return out


def _sharing(s: _Story) -> list[str]:
    out = [
        s.say("{N} had {number} {foods} in {pos} basket."),
        s.say("{Sub} saw {F} the {fkind} sitting near the {landmark}."),
        s.say("{F} looked hungry and {sad}."),
        s.say('"Would you like some?" asked {N}.'),
        s.say("{F} smiled, and they ate together by the {landmark}."),
    ]
    if s.rng.random() < 0.5:
        out += [
            s.say(
                "Then {a_animal}, {x} and {y} came by.",
                x=a(s.rng.choice(ANIMALS)),
                y=a(s.rng.choice(ANIMALS)),
            ),
            s.say("{N} gave each of them one too."),
        ]
    out.append(s.say("Soon {pos} basket was empty, but {pos} heart was full."))
    return out


ARCS = (_quest, _lost, _new_friend, _learning, _trip, _sharing)


def story(rng: random.Random) -> str:
    """One story; sentences are joined with single spaces."""
    s = _Story(rng)
    out = _intro(s) + rng.choice(ARCS)(s)
    out.append(s.say("{N} felt {happy}."))
    out.append(s.pick(ENDINGS))
    if rng.random() < 0.5:
        out.append(rng.choice(MORALS))
    return " ".join(out)


def build_story_corpus(
    out_dir: str | Path, n_train: int, n_test: int, seed: int = 0
) -> dict[str, Path]:
    """Write `train.jsonl` and `test.jsonl` ({"story": ...} per line) into `out_dir`.

    The train stories are drawn first, then the test stories, from one `random.Random(seed)`, so
    the same arguments give byte-identical files. Returns {"train": path, "test": path}.
    """
    assert n_train > 0 and n_test > 0, f"need stories in both splits, got {n_train}, {n_test}"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = {}
    for split, n in (("train", n_train), ("test", n_test)):
        lines = [json.dumps({"story": story(rng)}) for _ in range(n)]
        path = out / f"{split}.jsonl"
        write_text(path, "\n".join(lines) + "\n")
        paths[split] = path
    return paths
