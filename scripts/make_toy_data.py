"""Generate a small, deterministic toy dataset in AdvertiseGen (ADGEN) format.

Why: the real AdvertiseGen data has to be downloaded by hand, so glmtune
generates its own small dataset. With it the demo fine-tuning scripts run with
no download. Each record pairs a clothing attribute string ("content") with a
short Chinese product description ("summary"). The description mentions every
attribute value in the content, so a model fine-tuned on it can learn to copy
attributes into the text.

Format: JSON lines, UTF-8, LF line endings. Each line is
``json.dumps({"content": ..., "summary": ...}, ensure_ascii=False)``, e.g.

    content: 类型#上衣*颜色#白色*风格#简约*图案#刺绣*衣样式#外套*材质#牛仔布
    summary: 这款外套是今季人气很高的上衣单品。……

Each record picks its 类型 (上衣/裙/裤) first, then 3-7 other attributes that
fit that type, in a shuffled order. The summary starts with a sentence about
the type, then has one clause per attribute in shuffled order, with random
connectors, and ends with a closing sentence. All randomness comes from a
single ``random.Random(seed)``, so the output is byte-identical on every run.
No content string appears in both train and dev.

Regenerate the data shipped in data/adgen-toy/ (from the repository root):

    python3 scripts/make_toy_data.py --out-dir data/adgen-toy --train 2000 --dev 200 --seed 42

(These are the defaults, so ``python3 scripts/make_toy_data.py`` does the same.
The default --out-dir is data/adgen-toy under the repository root, wherever you
run it from.)
"""

import argparse
import json
import random
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = REPO_ROOT / "data" / "adgen-toy"

# ---------------------------------------------------------------------------
# Attribute schema. Dicts and tuples only (ordered, deterministic); no sets.
# ---------------------------------------------------------------------------

TYPES = ("上衣", "裙", "裤")

# The noun used in the opening sentence; it contains the type value verbatim.
TYPE_NOUN = {"上衣": "上衣", "裙": "裙装", "裤": "裤装"}

# The sub-kind key of each type (it goes into the opening sentence).
SUB_KIND_KEY = {"上衣": "衣样式", "裙": "裙型", "裤": "裤型"}

VALUES = {
    "衣样式": ("衬衫", "T恤", "卫衣", "外套", "毛衣", "风衣", "针织衫", "夹克", "西装", "马甲", "开衫", "雪纺衫"),
    "裙型": ("A字裙", "百褶裙", "连衣裙", "半身裙", "鱼尾裙", "包臀裙", "蛋糕裙", "铅笔裙", "吊带裙", "衬衫裙"),
    "裤型": (
        "阔腿裤",
        "直筒裤",
        "哈伦裤",
        "牛仔裤",
        "背带裤",
        "工装裤",
        "小脚裤",
        "喇叭裤",
        "灯笼裤",
        "烟管裤",
        "运动裤",
    ),
    "颜色": (
        "白色",
        "黑色",
        "红色",
        "粉色",
        "蓝色",
        "藏青色",
        "卡其色",
        "米白色",
        "灰色",
        "绿色",
        "黄色",
        "酒红色",
        "驼色",
    ),
    "材质": ("纯棉", "牛仔布", "雪纺", "针织", "真丝", "羊毛", "亚麻", "蕾丝", "灯芯绒", "网纱", "皮革", "羊绒"),
    "风格": ("简约", "休闲", "复古", "文艺", "通勤", "甜美", "街头", "优雅", "清新", "性感", "韩版", "淑女", "运动"),
    "图案": ("条纹", "格子", "碎花", "刺绣", "印花", "波点", "字母", "纯色", "撞色", "线条", "卡通", "豹纹"),
    "版型": ("宽松", "修身", "直筒", "收腰", "显瘦", "H型", "A型", "X型"),
    "衣领型": ("圆领", "V领", "翻领", "立领", "连帽", "娃娃领", "高领", "一字领", "方领", "POLO领"),
    "裙领型": ("圆领", "V领", "方领", "一字领", "娃娃领", "荷叶领", "立领", "挂脖"),
    "袖型": ("泡泡袖", "灯笼袖", "喇叭袖", "落肩袖", "蝙蝠袖", "插肩袖", "荷叶袖", "常规袖"),
    "衣长": ("短款", "中长款", "常规款", "长款", "超短款"),
    "裙长": ("短裙", "中长裙", "长裙", "及膝裙", "超短裙"),
    "裙腰型": ("高腰", "中腰", "低腰", "松紧腰", "抽绳腰"),
    "裤长": ("九分裤", "七分裤", "五分裤", "短裤", "长裤", "八分裤"),
    "裤腰型": ("高腰", "中腰", "低腰", "松紧腰", "抽绳腰"),
}

COMMON_KEYS = ("颜色", "材质", "风格", "图案", "版型")

# Keys that apply to each type, besides 类型 itself.
APPLICABLE = {
    "上衣": ("衣样式",) + COMMON_KEYS + ("衣领型", "袖型", "衣长"),
    "裙": ("裙型",) + COMMON_KEYS + ("裙领型", "袖型", "裙长", "裙腰型"),
    "裤": ("裤型",) + COMMON_KEYS + ("裤长", "裤腰型"),
}

MIN_ATTRS, MAX_ATTRS = 3, 7

# ---------------------------------------------------------------------------
# Summary templates. {v} is the attribute value, {n} the type noun.
# ---------------------------------------------------------------------------

OPENINGS_WITH_SUB = (
    "这款{s}是今季人气很高的{n}单品。",
    "{s}一直是衣橱里不可或缺的{n}。",
    "想找一件好穿的{n}，这款{s}值得入手。",
    "今天推荐的这款{n}是一件{s}。",
    "说到{n}，这款{s}一定不能错过。",
)

OPENINGS_NO_SUB = (
    "这款{n}设计简单却很耐看。",
    "今天给大家推荐一款好穿的{n}。",
    "这件{n}是日常穿搭的好选择。",
    "一件好看的{n}就能撑起整体造型。",
    "这款{n}一上架就很受欢迎。",
)

CLAUSES = {
    "颜色": ("{v}的配色低调耐看", "选用{v}，干净又百搭", "{v}调的设计很显气色", "一抹{v}让整体更出彩"),
    "材质": ("面料采用{v}，穿着舒适", "{v}材质手感细腻", "选用{v}面料，亲肤柔软", "{v}的质地垂感很好"),
    "风格": ("整体走{v}风格", "{v}的风格随性又有型", "透出满满的{v}气息", "{v}风的设计很有味道"),
    "图案": ("{v}图案增添看点", "点缀{v}元素，细节感满满", "{v}的设计让整体更灵动", "加入{v}图案，活泼又吸睛"),
    "版型": ("{v}版型包容性强", "采用{v}的剪裁，线条利落", "{v}的版型上身很有型", "{v}设计修饰身材"),
    "衣领型": ("{v}设计修饰脸型", "经典的{v}衬托颈部线条", "领口采用{v}，精致大方"),
    "裙领型": ("{v}设计修饰脸型", "{v}的领口衬托优美颈线", "领口做成{v}，温柔又精致"),
    "袖型": ("{v}的设计增添几分俏皮", "袖子做成{v}，修饰手臂线条", "搭配{v}，细节满满"),
    "衣长": ("{v}的衣长利落有型", "{v}设计拉长身材比例", "衣长为{v}，好搭又显高"),
    "裙长": ("{v}的长度恰到好处", "做成{v}，走起路来很灵动", "{v}的设计显得双腿修长"),
    "裙腰型": ("{v}设计提升腰线", "采用{v}，勾勒纤细腰身", "{v}的裙腰穿着不勒"),
    "裤长": ("{v}的长度刚刚好", "做成{v}，穿着轻松自在", "{v}的设计利落清爽"),
    "裤腰型": ("{v}设计拉长腿部比例", "采用{v}，穿着舒服不勒", "{v}的裤腰很显腿长"),
}

CONNECTORS = ("同时", "另外", "而且", "此外", "再加上", "并且")

CLOSINGS = (
    "无论通勤还是约会都很合适。",
    "日常穿搭轻松出彩。",
    "随手一搭就很有范儿。",
    "是四季都能穿的百搭单品。",
    "穿出自信好气质。",
    "喜欢的姑娘千万不要错过。",
    "简单搭配就能穿出时髦感。",
    "上身效果非常惊艳。",
)


def make_record(rng):
    """Build one {"content", "summary"} record from the generator ``rng``."""
    typ = rng.choice(TYPES)
    n_attrs = rng.randint(MIN_ATTRS, MAX_ATTRS)
    keys = rng.sample(APPLICABLE[typ], n_attrs)  # random subset, random order
    attrs = [(k, rng.choice(VALUES[k])) for k in keys]

    content = "*".join("#".join(kv) for kv in [("类型", typ)] + attrs)

    noun = TYPE_NOUN[typ]
    sub_key = SUB_KIND_KEY[typ]
    sub = None
    body = []
    for k, v in attrs:
        if k == sub_key:
            sub = v
        else:
            body.append((k, v))
    if sub is None:
        opening = rng.choice(OPENINGS_NO_SUB).format(n=noun)
    else:
        opening = rng.choice(OPENINGS_WITH_SUB).format(n=noun, s=sub)

    rng.shuffle(body)  # sentence order independent of the content order
    parts = [opening]
    for i, (k, v) in enumerate(body):
        clause = rng.choice(CLAUSES[k]).format(v=v)
        if i > 0 and rng.random() < 0.3:
            clause = rng.choice(CONNECTORS) + clause
        last = i == len(body) - 1
        parts.append(clause + ("。" if last or rng.random() < 0.35 else "，"))
    parts.append(rng.choice(CLOSINGS))
    return {"content": content, "summary": "".join(parts)}


def generate(n_train=2000, n_dev=200, seed=42):
    """Return (train_records, dev_records); every content string is unique."""
    rng = random.Random(seed)
    seen = set()  # membership tests only, never iterated
    records = []
    while len(records) < n_train + n_dev:
        rec = make_record(rng)
        if rec["content"] in seen:
            continue
        seen.add(rec["content"])
        records.append(rec)
    return records[:n_train], records[n_train:]


def write_jsonl(records, path):
    """Write records as UTF-8 JSON lines with LF endings."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps({"content": rec["content"], "summary": rec["summary"]}, ensure_ascii=False) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out-dir", default=str(DEFAULT_OUT_DIR), help="output directory (default: data/adgen-toy under the repo root)"
    )
    p.add_argument("--train", type=int, default=2000, help="number of train rows")
    p.add_argument("--dev", type=int, default=200, help="number of dev rows")
    p.add_argument("--seed", type=int, default=42, help="random seed")
    args = p.parse_args(argv)

    train, dev = generate(args.train, args.dev, args.seed)
    out = Path(args.out_dir)
    write_jsonl(train, out / "train.json")
    write_jsonl(dev, out / "dev.json")
    print(f"wrote {len(train)} rows to {out / 'train.json'}, {len(dev)} rows to {out / 'dev.json'}")


if __name__ == "__main__":
    main()
