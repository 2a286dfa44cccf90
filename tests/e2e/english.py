"""Ordinary English for the e2e prompts: plain prose on everyday subjects,
written for these tests, so that each request is the kind of text a user
sends (the demo model's tokenizer is trained on broad English, not on this
text). prose(start, words) joins paragraphs, starting at `start` and going
round, until it has at least `words` words."""

PARAGRAPHS = [
    "My grandmother kept a small garden behind her house, and every summer she grew "
    "tomatoes, beans and sunflowers taller than the fence. When I visited her as a child, "
    "we spent the mornings pulling weeds and the afternoons in the kitchen, shelling peas "
    "into a chipped blue bowl while she told me about the village where she grew up. She "
    "remembered the winter the river froze so hard that the baker drove his cart across it, "
    "and the spring the whole school walked out to watch the first airplane land in a "
    "neighbour's field. I did not understand then how much the world had changed during her "
    "lifetime. Looking back, I think she wanted me to notice that ordinary days are the ones "
    "we remember most clearly, long after the grand occasions have faded.",
    "The city council met on Tuesday evening to discuss the new bus routes, the price of "
    "parking downtown, and a proposal to plant three hundred trees along the main avenue "
    "before the end of next year. Several residents spoke in favour of the trees, pointing "
    "out that the street becomes unbearably hot in August and that shade would make the walk "
    "to the market pleasant again. A shop owner worried that the roots would lift the "
    "pavement and that falling leaves would block the drains every autumn. After an hour of "
    "debate the council agreed to start with a single block, measure the cost of care for "
    "two years, and then decide whether to continue. The bus routes were postponed until the "
    "next meeting because the report from the transport office arrived late.",
    "Learning to bake bread takes more patience than skill. The dough needs time to rise, and "
    "no amount of kneading will hurry the yeast. Most beginners add too much flour because "
    "the dough feels sticky, but a wetter dough usually gives a lighter loaf with a more open "
    "crumb. A good habit is to weigh the ingredients instead of measuring them in cups, since "
    "a cup of flour can differ by a third depending on how it is scooped. Let the loaf cool "
    "completely before cutting it, even though the smell makes that difficult. The inside "
    "keeps cooking for a while after it leaves the oven, and slicing too early leaves the "
    "middle gummy and heavy.",
    "The old bridge across the valley was built more than a century ago by workers who "
    "carried every stone up the hillside on their backs. For decades it was the only way to "
    "reach the town on the other side, and farmers crossed it each week with carts full of "
    "apples, cheese and wool. When the highway opened further south, traffic on the bridge "
    "slowly disappeared, and by the time I first walked across it, moss had covered the "
    "railings and a family of swallows nested under every arch. Last year the regional "
    "government announced that it would be repaired and opened to cyclists and walkers, and "
    "on a bright Saturday in May hundreds of people came to see the ribbon cut.",
    "Dear Maria, thank you for your letter and for the photographs from your trip to the "
    "coast. The children laughed for a long time at the picture of the seagull stealing your "
    "sandwich. We are all well here, although the weather has been grey for weeks and the "
    "garden is more mud than grass. Tom started his new job at the library in March and "
    "enjoys it very much; he says the hardest part is persuading people to return books on "
    "time. We hope you can visit us in the summer when the days are long. There is a spare "
    "room now that the boxes from the move are finally unpacked, and the train from the city "
    "takes less than two hours. Write soon and tell us your plans.",
    "Running a small bookshop teaches you a great deal about people. Some customers know "
    "exactly what they want and are out of the door in two minutes; others wander between "
    "the shelves for an hour and leave with something they never expected to read. On rainy "
    "afternoons the shop fills with students who sit on the floor of the poetry section and "
    "pretend they are not reading whole books without paying for them. I never ask them to "
    "leave. Many of them come back years later with their own children, and they remember the "
    "smell of the place and the cat that slept in the window, even if they have forgotten "
    "the titles of the books.",
    "Before you set out on a long walk in the mountains, check the weather forecast the "
    "evening before and again in the morning. Conditions change quickly at altitude, and a "
    "sunny start can turn into fog and cold rain by the early afternoon. Pack more water than "
    "you think you need, a warm layer, a map that does not depend on a battery, and something "
    "to eat that will not be crushed at the bottom of your bag. Tell someone where you are "
    "going and when you expect to return. Most accidents happen on the way down, when people "
    "are tired and hurrying, so plan to reach the top early and give yourself plenty of time "
    "for the descent.",
    "The history of the clock is also a history of how people organised their days. For most "
    "of human history, time was measured by the sun, and an hour in summer was longer than an "
    "hour in winter. Mechanical clocks appeared in the towers of European churches and town "
    "halls in the thirteenth and fourteenth centuries, and their bells told a whole town when "
    "to work, to eat and to pray. Railways made a single national time necessary, because a "
    "timetable is useless if every station keeps its own noon. Today the clocks in our phones "
    "agree to within a fraction of a second, and we rarely think about the long argument that "
    "made that possible.",
    "Our neighbours adopted a dog from the shelter last autumn, a nervous brown mongrel who "
    "hid under the kitchen table for the first three days and would only eat when nobody was "
    "watching. They were patient with him. Every morning they sat on the floor nearby and "
    "read the newspaper aloud in a quiet voice, and every evening they left the back door "
    "open so he could explore the garden on his own. By Christmas he was sleeping at the foot "
    "of their bed, and now he greets everyone on the street as if they were old friends. The "
    "children at the school gate call him the mayor, because he knows every family by name.",
    "Good meetings are short, have a clear purpose, and end with everyone knowing what they "
    "have agreed to do next. Before calling a meeting, it is worth asking whether an email "
    "or a quick conversation would do the same job. If a meeting is needed, send the agenda "
    "in advance so that people can prepare, invite only those who must be there, and start "
    "on time even if someone is late. Someone should take notes and share them the same day, "
    "with names beside each task and a date for each decision. Many teams find that a "
    "standing meeting of fifteen minutes each morning saves them hours of scattered "
    "messages later in the week.",
]


def prose(start: int, words: int) -> str:
    """Paragraphs from PARAGRAPHS[start % n] on, going round, until the
    text has at least `words` words; paragraphs are separated by a blank
    line, as a user would paste them."""
    out: list[str] = []
    count, i = 0, start
    while count < words:
        paragraph = PARAGRAPHS[i % len(PARAGRAPHS)]
        out.append(paragraph)
        count += len(paragraph.split())
        i += 1
    return "\n\n".join(out)
